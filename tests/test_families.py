"""Family detection reads module paths, which both exporters keep: as weight names (dynamo) or as
node names (TorchScript). Families sharing a prefix are told apart by their own modules."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from infercc.api import import_model
from infercc.families import detect_family
from tests.fixtures.catalog import fixture_info, fixture_path, list_fixtures


def _model(node_names: list[str], weight: str = "w") -> onnx.ModelProto:
    nodes, x = [], "x"
    for i, name in enumerate(node_names):
        nodes.append(helper.make_node("MatMul", [x, weight], [f"y{i}"], name=name))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(np.eye(4, dtype=np.float32), weight)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("names", "weight", "family"), [
    (["/model/transformer/h.0/attn/q_proj/MatMul"], "onnx::MatMul_1", "gptj"),  # TorchScript: node names
    (["/model/transformer/h.0/attn/qkv_proj/MatMul"], "onnx::MatMul_1", "codegen"),
    (["node_linear"], "transformer.h.0.attn.c_attn.weight", "gpt2"),  # dynamo: weight names
    (["/model/decoder/layers.0/fc1/MatMul"], "onnx::MatMul_1", "opt"),
    (["/model/transformer/blocks.0/attn/Wqkv/MatMul"], "onnx::MatMul_1", "mpt"),
    (["/model/transformer/h.0/self_attention/query_key_value/MatMul"], "onnx::MatMul_1", "falcon"),
    (["/model/layers.0/mlp/gate_up_proj/MatMul"], "onnx::MatMul_1", "phi3"),
    (["node_linear"], "model.layers.0.self_attn.q_proj.weight", "llama"),
    (["a"], "w", "unknown"),
])
def test_module_paths_name_the_family(names: list[str], weight: str, family: str) -> None:
    assert detect_family(import_model(_model(names, weight)))["family"] == family


@pytest.mark.parametrize("name", [n for n in list_fixtures() if fixture_info(n)["family"] in ("gpt2", "gpt_neox", "bert", "llama")])
def test_fixtures(name: str) -> None:
    assert detect_family(import_model(str(fixture_path(name))))["family"] == fixture_info(name)["family"]
