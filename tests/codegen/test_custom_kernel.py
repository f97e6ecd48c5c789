"""User C kernels (infercc.codegen.register_kernel): the example as a test, a custom-domain op
covered for backend="auto", an override of a standard op changing what runs (for graphs compiled
after registration only), hostile names and attribute strings never reaching the C source, and
clear errors: a template that does not compile, a kernel's icc_fail, the ORT fallback."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import infercc
from infercc.codegen import register_kernel, unregister_kernel
from infercc.codegen.emit import emit
from infercc.errors import ConfigError, InferccError, ModelLoadError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_kernel.py"
HOSTILE = 'x"); system("rm -rf /"); /*'


@pytest.fixture
def example():
    """The example's module (its functions), its kernel registered for the test and removed after."""
    module = runpy.run_path(str(EXAMPLE), run_name="infercc_example")
    module["register"]()
    yield module
    unregister_kernel("ScaledTanh", module["DOMAIN"])
    unregister_kernel("Relu")
    unregister_kernel("Broken", "com.example")


def test_the_example_matches_numpy_on_the_c_runtime(example, tmp_path) -> None:
    assert example["run"](tmp_path, alpha=1.5) < 1e-5


def test_a_custom_op_with_a_kernel_counts_as_covered_for_auto(example, tmp_path) -> None:
    bias = example["build_model"](tmp_path / "m.onnx", 3.0)
    compiled = infercc.compile(tmp_path / "m.onnx", backend="auto")
    x = np.linspace(-2, 2, 8, dtype=np.float32).reshape(2, 4)
    got = compiled.run({"x": x})["y"]
    assert compiled.runtime == "c", compiled.runtime_reason
    np.testing.assert_allclose(got, 3.0 * np.tanh(x + bias) * bias, atol=1e-6)
    assert "scaled_tanh(" in emit(compiled.model, compiled.kernels).source  # helpers included


def test_without_the_c_runtime_a_custom_op_is_refused_naming_it(example, tmp_path) -> None:
    example["build_model"](tmp_path / "m.onnx")
    with pytest.raises(ModelLoadError, match="ScaledTanh.*backend='c'"):  # backend="ort": refused at compile
        infercc.compile(tmp_path / "m.onnx", backend="ort")
    unregister_kernel("ScaledTanh", example["DOMAIN"])
    with pytest.raises(ModelLoadError, match="ScaledTanh"):  # no kernel registered: refused at compile
        infercc.compile(tmp_path / "m.onnx", backend="c")


def test_a_build_failure_falls_back_to_ort_which_names_the_custom_op(example, tmp_path) -> None:
    example["build_model"](tmp_path / "m.onnx")
    register_kernel("ScaledTanh", example["DOMAIN"], "{{ inputs[0] }}->no_such_field = 1;", check=False)
    compiled = infercc.compile(tmp_path / "m.onnx", backend="c")
    with pytest.warns(UserWarning, match="could not build"), pytest.raises(ModelLoadError) as info:
        compiled.run({"x": np.zeros((1, 4), np.float32)})
    message = str(info.value)
    assert "ScaledTanh" in message and "register_kernel" in message and "\n" not in message


def test_overriding_relu_changes_what_runs_for_models_compiled_after(example, tmp_path) -> None:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "relu.onnx")
    x = np.array([-2.0, -0.5, 0.0, 3.0], np.float32)
    before = infercc.compile(tmp_path / "relu.onnx", backend="c")
    leaky = ("{{ outputs[0] }}->dt = ICC_F32; icc_set_shape({{ outputs[0] }}, {{ inputs[0] }}->r, {{ inputs[0] }}->d);"
             " icc_alloc({{ outputs[0] }});\n"
             "for (int64_t i = 0; i < icc_numel({{ inputs[0] }}); i++) { float v = ((const float *){{ inputs[0] }}->p)[i];"
             " ((float *){{ outputs[0] }}->p)[i] = v > 0 ? v : {{ attrs.slope }} * v; }")
    register_kernel("Relu", "", leaky, attributes={"slope": 0.25})
    after = infercc.compile(tmp_path / "relu.onnx", backend="c")
    np.testing.assert_array_equal(after.run({"x": x})["y"], np.where(x > 0, x, 0.25 * x))
    assert after.runtime == "c"
    np.testing.assert_array_equal(before.run({"x": x})["y"], np.maximum(x, 0))  # compiled before: ours
    unregister_kernel("Relu")
    np.testing.assert_array_equal(infercc.compile(tmp_path / "relu.onnx", backend="c").run({"x": x})["y"],
                                  np.maximum(x, 0))


def test_a_kernels_icc_fail_reaches_python(example, tmp_path) -> None:
    template = ('if ({{ attrs.alpha }} < 0) icc_fail("ScaledTanh: alpha must be >= 0"); else {\n'
                + example["TEMPLATE"] + "}")
    register_kernel("ScaledTanh", example["DOMAIN"], template, helpers=example["HELPERS"], attributes={"alpha": 1.0})
    example["build_model"](tmp_path / "m.onnx", alpha=-1.0)
    compiled = infercc.compile(tmp_path / "m.onnx", backend="c")
    with pytest.raises(InferccError, match="alpha must be >= 0"):
        compiled.run({"x": np.zeros((2, 4), np.float32)})


def test_hostile_names_and_attribute_strings_never_reach_the_source(example, tmp_path) -> None:
    node = helper.make_node("ScaledTanh", ["x"], ["y"], name=HOSTILE, domain=example["DOMAIN"], alpha=2.0,
                            mode=HOSTILE, modes=[HOSTILE, "b"])
    node.attribute.append(helper.make_attribute("ok", 1))
    node.attribute[-1].name = HOSTILE  # an attribute whose *name* is hostile
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(example["DOMAIN"], 1)])
    onnx.save(model, tmp_path / "hostile.onnx")
    compiled = infercc.compile(tmp_path / "hostile.onnx", backend="c")
    x = np.array([-1.0, 0.5], np.float32)
    np.testing.assert_allclose(compiled.run({"x": x})["y"], 2.0 * np.tanh(x), atol=1e-6)
    source = emit(compiled.model, compiled.kernels).source
    assert HOSTILE not in source and "system(" not in source and '"rm' not in source  # names: sanitized comments
    body = source[source.index("int icc_run("):]
    assert body.count("/*") == body.count("*/")
    # A template that asks for the string attribute gets nothing: no kernel for the node, and the
    # fallback (ONNX Runtime has no ScaledTanh) says so by name.
    register_kernel("ScaledTanh", example["DOMAIN"], "/* {{ attrs.mode }} */", check=False)
    asks = infercc.compile(tmp_path / "hostile.onnx", backend="c")
    with pytest.warns(UserWarning, match="not numeric"), pytest.raises(ModelLoadError, match="ScaledTanh"):
        asks.run({"x": x})


@pytest.mark.parametrize("op_type, domain", [(HOSTILE, ""), ("Relu */", ""), ("", ""), ("Op", HOSTILE),
                                             ("Op", "a..b"), ("Op", "ai.infercc"), ("Op", "ai.onnx")])
def test_hostile_op_types_and_domains_are_refused(op_type: str, domain: str) -> None:
    with pytest.raises(ConfigError, match="register_kernel"):
        register_kernel(op_type, domain, "{{ outputs[0] }}->dt = ICC_F32;")


@pytest.mark.parametrize("value", ["text", b"bytes", ["a", "b"], {"k": 1}, None])
def test_attribute_defaults_must_be_numbers(value) -> None:
    with pytest.raises(ConfigError, match="numbers"):
        register_kernel("Op", "com.example", "{{ outputs[0] }}->dt = ICC_F32;", attributes={"a": value})


def test_a_template_that_does_not_compile_is_refused_naming_the_op() -> None:
    with pytest.raises(ConfigError, match=r"Broken.*does not compile.*undeclared_thing"):
        register_kernel("Broken", "com.example", "undeclared_thing({{ inputs[0] }});")
    with pytest.raises(ConfigError, match=r"Broken.*not valid jinja2"):
        register_kernel("Broken", "com.example", "{% if %}")
    with pytest.raises(ConfigError, match=r"Broken.*does not render.*attributes="):
        register_kernel("Broken", "com.example", "float a = {{ attrs.alpha }};")
    assert not unregister_kernel("Broken", "com.example")  # nothing was registered


def test_attribute_literals_render_as_c() -> None:
    kernel = register_kernel("Lit", "com.example", "{{ attrs.f }} {{ attrs.i }} {{ attrs.l }} {{ attrs.n }} {{ attrs.l[1] }}",
                             attributes={"f": float("inf"), "i": 2**40, "l": [1, 2.5], "n": -3}, check=False)
    try:
        assert kernel.render([], [], dict(kernel.attributes), [])[1] == "INFINITY 1099511627776LL {1, 2.5f} -3 2.5f"
    finally:
        unregister_kernel("Lit", "com.example")


def test_a_saved_custom_op_model_loads_with_its_kernel_registered(example, tmp_path) -> None:
    bias = example["build_model"](tmp_path / "m.onnx", 2.0)
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    infercc.compile(tmp_path / "m.onnx", backend="c").save(tmp_path / "saved")
    loaded = infercc.load(tmp_path / "saved")
    np.testing.assert_allclose(loaded.run({"x": x})["y"], 2.0 * np.tanh(x + bias) * bias, atol=1e-6)
    assert loaded.runtime == "c"
    unregister_kernel("ScaledTanh", example["DOMAIN"])
    without = infercc.load(tmp_path / "saved")
    with pytest.warns(UserWarning, match="no C kernel"), pytest.raises(ModelLoadError, match="ScaledTanh"):
        without.run({"x": x})
