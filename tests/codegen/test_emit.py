"""The generated source: warning-free under -Wall -Wextra, deterministic, model names never
reaching it raw, a portable build, and an op without a C kernel falling back to ONNX Runtime."""

from __future__ import annotations

import subprocess
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import infercc
from infercc.codegen.build import (
    NATIVE,
    OPT_ENV,
    PORTABLE,
    BuildError,
    build,
    compiler,
    precompiled,
    warnings_of,
    with_opt_level,
)
from infercc.codegen.emit import emit, q_tiles
from tests.fixtures import catalog

HOSTILE = ['x"; system("rm -rf /"); //', "a*/b/*c", "new\nline\\", "naïve ünïcode ✓", "#define x 1"]


def _hostile_model(path) -> None:
    """Add -> Relu -> Softmax with every name taken from HOSTILE."""
    x, y, mid, act = HOSTILE[0], HOSTILE[1], HOSTILE[2], HOSTILE[3]
    nodes = [helper.make_node("Add", [x, "bias"], [mid], name=HOSTILE[4]),
             helper.make_node("Relu", [mid], [act], name=HOSTILE[1] + "n"),
             helper.make_node("Softmax", [act], [y], name=HOSTILE[2] + "m", axis=-1)]
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [4], [0.5, -1.0, 2.0, 0.0])
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["n", 4])], [bias])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_hostile_names_never_reach_the_source(tmp_path) -> None:
    _hostile_model(tmp_path / "hostile.onnx")
    compiled = infercc.compile(tmp_path / "hostile.onnx", backend="c")
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    got = compiled.run({HOSTILE[0]: x})[HOSTILE[1]]
    assert compiled.runtime == "c", compiled.runtime_reason
    shifted = np.maximum(x + np.array([0.5, -1.0, 2.0, 0.0], np.float32), 0)
    expected = np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    source = emit(compiled.model).source
    for name in HOSTILE:
        assert name not in source
    assert "system(" not in source and "rm -rf" not in source and "✓" not in source
    body = source[source.index("int icc_run("):]
    assert body.count("/*") == body.count("*/")  # no comment was closed early by a name


def test_generated_source_is_deterministic_and_warning_free() -> None:
    source = str(catalog.fixture_path("llama_dynamo"))
    first = emit(infercc.compile(source, backend="c", quantize="int4").model).source
    second = emit(infercc.compile(source, backend="c", quantize="int4").model).source
    assert first == second
    assert warnings_of(first) == []


def test_the_library_compiles_only_the_quantized_tiles_it_calls() -> None:
    """ICC_Q_USED holds the (bits, block) of the model's quantized matmuls and nothing else (the
    outputs of such a library are checked everywhere the C runtime runs int4/int8 models); a
    float model compiles none; a user kernel (whose C may call any) brings them all back."""
    source = str(catalog.fixture_path("llama_dynamo"))
    model = infercc.compile(source, backend="c", quantize="int4").model
    tiles = {(int(n.attr("bits")), int(n.attr("block_size"))) for n in model.graph.nodes if n.op_type == "MatMulQuant"}
    want = sum(1 << ((bits == 8) * 5 + {16: 0, 32: 1, 64: 2, 128: 3}.get(block, 4)) for bits, block in tiles)
    assert tiles and f"#define ICC_Q_USED {want:#x} " in emit(model).source
    assert "#define ICC_Q_USED 0x0 " in emit(infercc.compile(source, backend="c").model).source
    lines = [{"lines": ["icc_matmul_q(icc_numel(x) / 64, 32, 64, 8, 128, (const float *)x->p, W + 0, y);"]}]
    assert q_tiles(lines, custom_ops=False) == 1 << 8 and q_tiles(lines, custom_ops=True) == 0x3FF
    assert q_tiles([{"lines": ["icc_matmul_q(m, 32, 96, 4, 256, (const float *)x->p, W, y);"]}], False) == 1 << 4


def test_portable_flags_build_and_run_the_same(tmp_path) -> None:
    compiled = infercc.compile(catalog.fixture_path("gpt2_dynamo"), backend="c")
    program = emit(compiled.model)
    assert build(program.source, PORTABLE).exists()
    assert warnings_of(program.source, PORTABLE) == []


def test_system_headers_are_precompiled_once_and_give_the_same_library(tmp_path, monkeypatch) -> None:
    """gcc reads the precompiled system headers (``-H`` marks a used one with "!") and the library
    is the one built from the plain text headers; a second build reuses the header."""
    monkeypatch.setenv("INFERCC_CACHE_DIR", str(tmp_path / "cache"))
    cc, flags = compiler(), with_opt_level(NATIVE)
    if "clang" in subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.lower():
        pytest.skip("clang: no gcc precompiled header")
    model = tmp_path / "model.onnx"
    _hostile_model(model)
    program = emit(infercc.compile(model, backend="c").model)
    args = precompiled(cc, flags)
    (gch,) = (tmp_path / "cache").rglob("*.gch")
    assert args == ["-include", str(gch.with_suffix(""))]
    stamp = gch.stat().st_mtime_ns
    source = tmp_path / "model.c"
    source.write_text(program.source)
    outputs = {}
    for name, extra in (("text", []), ("precompiled", args)):
        done = subprocess.run([cc, *flags, *extra, "-H", "-Winvalid-pch", str(source), "-o", str(tmp_path / f"{name}.so"),
                               "-lm"], capture_output=True, text=True, check=True)
        outputs[name] = (tmp_path / f"{name}.so").read_bytes()
        used = [line for line in done.stderr.splitlines() if line.startswith("!")]
        assert (used == [f"! {gch}"]) == bool(extra), done.stderr[:2000]
        assert "invalid" not in done.stderr
    assert outputs["text"] == outputs["precompiled"]
    assert build(program.source).exists() and precompiled(cc, flags) == args
    assert gch.stat().st_mtime_ns == stamp


def test_the_optimization_level_comes_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv(OPT_ENV, "-O1")
    assert with_opt_level(NATIVE) == ("-O1", *NATIVE[1:])
    monkeypatch.setenv(OPT_ENV, "-O2 -fplugin=evil.so")  # one level, nothing smuggled into the command
    with pytest.raises(BuildError, match="INFERCC_C_OPT.*not an optimization level"):
        with_opt_level(NATIVE)
    monkeypatch.delenv(OPT_ENV)
    assert with_opt_level(NATIVE) == NATIVE


def test_an_op_without_a_kernel_falls_back_to_ort_with_the_reason(tmp_path) -> None:
    node = helper.make_node("Einsum", ["a", "b"], ["c"], equation="ij,jk->ik")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3]),
                                            helper.make_tensor_value_info("b", TensorProto.FLOAT, [3, 2])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "einsum.onnx")
    a, b = np.ones((2, 3), np.float32), np.arange(6, dtype=np.float32).reshape(3, 2)
    compiled = infercc.compile(tmp_path / "einsum.onnx", backend="c")
    with pytest.warns(UserWarning, match="Einsum"):
        out = compiled.run({"a": a, "b": b})["c"]
    assert compiled.runtime == "ort" and "no C kernel for Einsum" in compiled.runtime_reason
    np.testing.assert_allclose(out, a @ b)
    quiet = infercc.compile(tmp_path / "einsum.onnx", backend="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.run({"a": a, "b": b})
    assert quiet.runtime == "ort"


def test_backend_is_validated() -> None:
    with pytest.raises(infercc.errors.ConfigError, match="backend"):
        infercc.Config(backend="gpu")


def test_the_default_backend_is_auto_and_the_environment_sets_it(monkeypatch) -> None:
    """Config.backend defaults to "auto" (the test suite pins "ort" through INFERCC_BACKEND, see
    conftest.py); the variable sets a process's default, a bad value is an error naming it."""
    monkeypatch.delenv("INFERCC_BACKEND", raising=False)
    assert infercc.Config().backend == "auto"
    monkeypatch.setenv("INFERCC_BACKEND", "c")
    assert infercc.Config().backend == "c" and infercc.Config(backend="ort").backend == "ort"
    monkeypatch.setenv("INFERCC_BACKEND", "gpu")
    with pytest.raises(infercc.errors.ConfigError, match="INFERCC_BACKEND"):
        infercc.Config()


def test_a_default_compile_runs_on_c_and_a_standard_onnx_lowering_on_ort(monkeypatch) -> None:
    """With no backend given, the built-in tiny decoder (causal mask from ConstantOfShape and Trilu)
    runs as generated C and matches ONNX Runtime on the unoptimized model; lowering="onnx" asks for
    a standard-ONNX graph, which "auto" leaves to ONNX Runtime."""
    from infercc.demo import tiny_decoder
    from infercc.ir import load_model
    from infercc.runtime.ort_backend import OrtBackend

    monkeypatch.delenv("INFERCC_BACKEND", raising=False)
    proto = tiny_decoder()
    ids = np.random.default_rng(0).integers(0, 256, size=(2, 16)).astype(np.int64)
    reference = OrtBackend(load_model(proto), ["CPUExecutionProvider"]).run({"input_ids": ids})["logits"]
    compiled = infercc.compile(proto)
    got = compiled.run({"input_ids": ids})["logits"]
    assert compiled.runtime == "c", compiled.runtime_reason
    np.testing.assert_allclose(got, reference, atol=1e-4, rtol=1e-4)
    portable = infercc.compile(proto, lowering="onnx")
    np.testing.assert_allclose(portable.run({"input_ids": ids})["logits"], reference, atol=1e-4, rtol=1e-4)
    assert portable.runtime == "ort" and all(n.domain in ("", "ai.onnx") for n in portable.model.graph.nodes)


@pytest.mark.parametrize("value", [1 / 8 ** 0.5, 0.1, 1e-5, 3.4028234663852886e38, 1e39, -2.0, 0.0])
def test_a_float_attribute_gives_the_same_literal_after_a_float32_round_trip(value: float) -> None:
    """An attribute computed as a Python double (an attention scale of 1/sqrt(8)) is saved as a
    float32 in model.onnx: the source regenerated at load must be byte-identical to the saved one
    (else the saved weight blob is not trusted and everything is packed again)."""
    from infercc.codegen.ops import lit

    with np.errstate(over="ignore"):
        assert lit(value) == lit(float(np.float32(value)))
    assert lit(1e39) == "INFINITY"
