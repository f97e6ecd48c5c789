"""infercc's typed graph IR: values, nodes, graphs, models, plus ONNX import/export and checks."""

from .dtypes import DType
from .graph import Graph, NameScope
from .model import Model
from .node import Attr, AttrType, Node
from .onnx_io import load_model, save_model, to_proto
from .tensor import Tensor, const
from .value import Dim, Shape, Value
from .verify import VerifyError, verify

__all__ = [
    "Attr", "AttrType", "DType", "Dim", "Graph", "Model", "NameScope", "Node", "Shape", "Tensor",
    "Value", "VerifyError", "const", "load_model", "save_model", "to_proto", "verify",
]
