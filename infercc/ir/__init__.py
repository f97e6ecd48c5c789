"""infercc's typed graph IR: values, nodes, graphs, models, plus ONNX import/export and checks."""

from .dtypes import DType
from .graph import Graph, NameScope
from .model import Model
from .node import Attr, AttrType, Node
from .onnx_export import to_proto
from .onnx_import import load_model
from .onnx_save import save_model
from .tensor import Tensor, const
from .value import Dim, Shape, Value
from .verify import VerifyError, verify

__all__ = [
    "Attr", "AttrType", "DType", "Dim", "Graph", "Model", "NameScope", "Node", "Shape", "Tensor",
    "Value", "VerifyError", "const", "load_model", "save_model", "to_proto", "verify",
]
