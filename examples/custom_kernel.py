"""A custom C kernel for the generated-C runtime (``infercc.codegen.register_kernel``).

The model below uses an op ONNX does not have, ``com.example::ScaledTanh`` (y = alpha * tanh(x)),
between two standard ops. ONNX Runtime cannot run it; with its C kernel registered, infercc
compiles the whole graph into one C library and runs it. Run it: ``python examples/custom_kernel.py``.

The template is jinja2 rendered once per node: ``inputs``/``outputs`` are ``icc_t *`` C
expressions, ``attrs`` the node's numeric attributes as C literals (see infercc/codegen/custom.py
for the whole contract: reading dims and element types, ``icc_alloc``, ``icc_fail``).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

import infercc
from infercc.codegen import register_kernel, unregister_kernel

DOMAIN = "com.example"

#: C helpers, placed once in the translation unit (shared by every ScaledTanh node).
HELPERS = """
static void scaled_tanh(const float *x, float *y, int64_t n, float alpha) {
    #pragma omp parallel for if (n > 65536)
    for (int64_t i = 0; i < n; i++) y[i] = alpha * tanhf(x[i]);
}
"""

#: C statements per node: output shaped like the input, allocated, computed; errors via icc_fail.
TEMPLATE = """
icc_t *x = {{ inputs[0] }}, *y = {{ outputs[0] }};
if (x->dt != ICC_F32) { icc_fail("ScaledTanh: the input must be float32"); }
else {
    y->dt = ICC_F32;
    y->r = x->r;
    memcpy(y->d, x->d, sizeof(int64_t) * ICC_MAX_RANK);
    icc_alloc(y);
    if (!icc_err) scaled_tanh((const float *)x->p, (float *)y->p, icc_numel(x), {{ attrs.alpha }});
}
"""


def register() -> None:
    """Register the kernel (checked now: a template that does not compile is refused, by name)."""
    register_kernel("ScaledTanh", DOMAIN, TEMPLATE, helpers=HELPERS, attributes={"alpha": 1.0})


def build_model(path: Path, alpha: float = 2.0) -> np.ndarray:
    """x -> Add(bias) -> ScaledTanh(alpha) -> Mul(bias) -> y, saved at ``path``; returns the bias."""
    bias = np.array([0.5, -1.0, 2.0, 0.25], np.float32)
    nodes = [helper.make_node("Add", ["x", "bias"], ["h"], name="add"),
             helper.make_node("ScaledTanh", ["h"], ["t"], name="scaled_tanh", domain=DOMAIN, alpha=alpha),
             helper.make_node("Mul", ["t", "bias"], ["y"], name="mul")]
    graph = helper.make_graph(nodes, "custom", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor("bias", TensorProto.FLOAT, [4], bias)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    onnx.save(model, path)
    return bias


def run(folder: Path, alpha: float = 2.0) -> float:
    """Compile with backend="c", run, compare with numpy; the largest absolute difference."""
    bias = build_model(folder / "custom.onnx", alpha)
    compiled = infercc.compile(folder / "custom.onnx", backend="c")
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    got = compiled.run({"x": x})["y"]
    if compiled.runtime != "c":
        raise RuntimeError(f"expected the generated-C runtime: {compiled.runtime_reason}")
    expected = alpha * np.tanh(x + bias) * bias
    return float(np.abs(got - expected).max())


def main() -> int:
    register()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            error = run(Path(tmp))
    finally:
        unregister_kernel("ScaledTanh", DOMAIN)
    print(f"ScaledTanh on the generated-C runtime matches numpy (max abs error {error:.2e})")
    return 0 if error < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
