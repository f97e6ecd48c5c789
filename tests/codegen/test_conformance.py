"""ONNX conformance of the generated-C runtime: the backend node tests that ship with the onnx
package, run through the ``onnx.backend`` adapter (infercc/codegen/onnx_backend.py) for every
standard op the runtime claims (infercc/codegen/claims.py).

The onnx wheel ships the node tests as generators (``onnx.backend.test.case.node``; there is no
``data/node`` folder): ``collect_testcases()`` gives each case in memory (a model, inputs, expected
outputs), which is also what ``onnx.backend.test.BackendTest`` runs. Outputs are compared with the
runner's tolerances (rtol 1e-3, atol 1e-7) and exact dtype and shape.

Cost: each case builds one shared library (~0.2-0.5 s of gcc on these small sources). The default
run takes one representative case per claimed op plus the cases the kernel fixes of this suite
were made for (~75 builds, ~15 s on 2 cores) and checks, without building, that every case an
exclusion matches is refused cleanly; ``-m slow`` runs every claimed case through onnx's own
runner, ``onnx.backend.test.BackendTest`` (~360 builds, ~35-75 s alone on 2 cores: too much for the
default suite's budget while others share the cores).
The builds use the production flags (NATIVE): a lower -O would test a different compilation of
the same kernels, and -O3 is barely slower here (unused static kernels are dropped early). The build cache is a per-session temporary folder, so a run
always compiles what it tests.
"""

from __future__ import annotations

import functools
import io
import json
import re
import unittest
import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from infercc.cli import main
from infercc.codegen.claims import EXCLUSIONS, claimed_ops, exclusion_for, kernel_ops
from infercc.codegen.onnx_backend import BackendUnsupported, GeneratedCBackend

CLAIMED = claimed_ops()


@functools.cache
def _all_cases() -> tuple:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():  # the generators compute edge cases (1/0, log(-1)) on purpose
        warnings.simplefilter("ignore")
        return tuple(collect_testcases())


def _standard(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx") and node.op_type in CLAIMED


@functools.cache
def _cases() -> dict[str, list]:
    """Claimed op -> its node-test cases (one-node models; the function-expanded variants, several
    nodes, are in ``_expanded_cases``)."""
    by_op: dict[str, list] = {op: [] for op in CLAIMED}
    for case in _all_cases():
        nodes = case.model.graph.node
        if len(nodes) == 1 and _standard(nodes[0]):
            by_op[nodes[0].op_type].append(case)
    return {op: sorted(found, key=lambda c: c.name) for op, found in by_op.items()}


def _expanded_cases() -> list:
    """Function-expanded node tests (a function op written as several standard nodes: Clip as
    Less/Where, ReduceL1 as Abs/ReduceSum...) made only of claimed ops and claimed types: they run
    multi-node graphs, so they also test the emitter's slots and liveness, not just one kernel."""
    return [c for c in _all_cases() if len(c.model.graph.node) > 1 and all(map(_standard, c.model.graph.node))
            and exclusion_for(c.model) is None]


def _claimed_cases(op: str) -> list:
    return [c for c in _cases()[op] if exclusion_for(c.model) is None]


@pytest.fixture(autouse=True)
def _fresh_build_cache(tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setenv("INFERCC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "conformance-cache"))


def _array(x) -> np.ndarray:
    return numpy_helper.to_array(x) if isinstance(x, onnx.TensorProto) else np.asarray(x)


def _check(case) -> None:
    assert GeneratedCBackend.is_compatible(case.model), f"{case.name}: claimed but refused"
    rep = GeneratedCBackend.prepare(case.model)
    for inputs, expected in case.data_sets:
        got = rep.run([_array(x) for x in inputs])
        assert len(got) == len(expected), case.name
        for name, g, e in zip([o.name for o in case.model.graph.output], got, expected):
            e = _array(e)
            assert g.dtype == e.dtype, f"{case.name} output {name}: dtype {g.dtype}, expected {e.dtype}"
            assert g.shape == e.shape, f"{case.name} output {name}: shape {g.shape}, expected {e.shape}"
            np.testing.assert_allclose(g, e, rtol=case.rtol, atol=case.atol, err_msg=f"{case.name} output {name}")


@pytest.mark.parametrize("op", CLAIMED)
def test_representative_case_of_each_claimed_op(op: str) -> None:
    """One case per op (the first claimed one by name) runs and matches onnx's expected outputs."""
    cases = _claimed_cases(op)
    assert cases, f"{op} is claimed but onnx ships no node test for it outside the exclusions"
    _check(cases[0])


#: Cases that failed before the kernel fixes this suite brought (kept in the default run so those
#: fixes stay covered without -m slow): Clip with min > max and on int8, Mod fmod=1 on integers and
#: fmod=0 on floats and float16, binary ops on int8 / uint8 / float16, Pow with an integer exponent,
#: Max / Min of one and of three inputs, Gemm with an activation B, transA, alpha, beta and a matrix C,
#: Cast fed as a TensorProto, reductions of bool inputs.
REGRESSIONS = ("test_clip_min_greater_than_max", "test_clip_default_int8_min", "test_mod_int64_fmod",
               "test_mod_mixed_sign_float32", "test_mod_float_edge_cases_fmod_0_float16", "test_add_int8", "test_mul_uint8",
               "test_max_float16", "test_pow_types_float32_int64", "test_max_one_input", "test_min_example",
               "test_gemm_all_attributes", "test_gemm_default_matrix_bias", "test_gemm_transposeA",
               "test_cast_FLOAT_to_FLOAT16", "test_reduce_max_bool_inputs", "test_reduce_min_bool_inputs")


@pytest.mark.parametrize("name", REGRESSIONS)
def test_fixed_case(name: str) -> None:
    found = [c for op in CLAIMED for c in _claimed_cases(op) if c.name == name]
    assert len(found) == 1, f"{name}: not a claimed node-test case of this onnx version"
    _check(found[0])


def test_a_function_expanded_case() -> None:
    """One multi-node graph in the default run (the others under -m slow)."""
    found = [c for c in _expanded_cases() if c.name == "test_reduce_l1_keep_dims_random_expanded"]
    assert len(found) == 1
    _check(found[0])


@pytest.mark.slow
def test_onnx_backend_test_runner_passes_every_claimed_case() -> None:
    """The full set through onnx's own runner (``onnx.backend.test.BackendTest``, which takes the node
    cases from the same generators): every one-node case of a claimed op and every function-expanded
    case made of claimed ops, outside the exclusions, runs and passes; none is skipped."""
    import onnx.backend.test

    from infercc.codegen import onnx_backend

    names = [c.name for c in _all_cases() if all(map(_standard, c.model.graph.node)) and exclusion_for(c.model) is None]
    assert len(names) >= 350  # onnx 1.23: 362; a filter gone wrong must not pass by testing nothing
    runner = onnx.backend.test.BackendTest(onnx_backend, __name__)
    runner.include("^(" + "|".join(re.escape(n) for n in names) + ")_cpu$")
    suite = unittest.TestSuite(unittest.defaultTestLoader.loadTestsFromTestCase(case) for case in runner.test_cases.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = unittest.TextTestRunner(stream=io.StringIO(), verbosity=0).run(suite)
    failed = [f"{test.id().rsplit('.', 1)[-1]}: {text.strip().splitlines()[-1][:300]}" for test, text in result.failures + result.errors]
    assert not failed, "\n".join(failed)
    assert result.testsRun - len(result.skipped) == len(names)


def test_excluded_cases_are_refused_not_run_wrong() -> None:
    """Every case an exclusion matches is refused when emitting (no build: ``is_compatible`` only
    emits), so outside the claim a model goes to ONNX Runtime instead of computing garbage; and
    every exclusion still matches some case (a stale exclusion would hide a claim)."""
    used = set()
    accepted = []
    for op in CLAIMED:
        for case in _cases()[op]:
            exclusion = exclusion_for(case.model)
            if exclusion is None:
                continue
            used.add(exclusion)
            if GeneratedCBackend.is_compatible(case.model):
                accepted.append(f"{case.name} ({exclusion.what})")
    assert not accepted, f"excluded but accepted by the emitters: {accepted}"
    assert used == set(EXCLUSIONS), f"exclusions matching no case: {[e.what for e in set(EXCLUSIONS) - used]}"


def test_a_model_outside_the_claim_is_reported_unsupported() -> None:
    """The adapter's "not supported" answer: is_compatible False, prepare raises naming the node."""
    node = onnx.helper.make_node("Det", ["x"], ["y"], name="det0")
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 2])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    assert not GeneratedCBackend.is_compatible(model)
    with pytest.raises(BackendUnsupported, match="no C kernel for Det 'det0'"):
        GeneratedCBackend.prepare(model)


def test_feeds_of_the_wrong_dtype_are_refused() -> None:
    """The library would convert silently; a conformance run must see the declared type or fail."""
    case = _claimed_cases("Add")[0]
    rep = GeneratedCBackend.prepare(case.model)
    inputs = [_array(x).astype(np.float64) for x in case.data_sets[0][0]]
    with pytest.raises(BackendUnsupported, match="model declares float32"):
        rep.run(inputs)


def test_inspect_ops_prints_the_claim_and_the_exclusions(capsys) -> None:
    assert main(["inspect", "--ops"]) == 0
    out = capsys.readouterr().out
    listed = set(out.split())
    assert set(CLAIMED) <= listed and set(kernel_ops()) <= listed
    assert "Det" not in listed  # only what has a kernel
    for e in EXCLUSIONS:
        assert e.what in out and e.reason in out
    assert main(["inspect", "--ops", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["standard"] == CLAIMED
    assert [x["what"] for x in report["exclusions"]] == [e.what for e in EXCLUSIONS]


def test_inspect_without_model_or_ops_is_one_line_error(capsys) -> None:
    assert main(["inspect"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--ops" in err and err.count("\n") == 1


def _one_node(op: str, dtype: np.dtype, **attrs) -> onnx.ModelProto:
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    node = onnx.helper.make_node(op, ["x"], ["y"], name=f"{op.lower()}0", **attrs)
    graph = onnx.helper.make_graph([node], op, [onnx.helper.make_tensor_value_info("x", elem, [2, 3])],
                                   [onnx.helper.make_tensor_value_info("y", elem, [2, 3])])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 14)])


@pytest.mark.parametrize(("op", "dtype", "fn"), [
    ("Neg", np.int32, np.negative), ("Abs", np.int8, np.abs), ("Relu", np.int8, lambda x: np.maximum(x, 0)),
    ("Sqrt", np.float16, np.sqrt), ("Exp", np.float16, np.exp), ("Neg", np.float16, np.negative)])
def test_unary_kernels_beyond_float32(op: str, dtype, fn) -> None:
    """Integer Neg / Abs / Relu and float16 math (the node tests only have float32 cases of these):
    integers exactly, float16 computed in float32 and rounded once."""
    x = np.array([[-3, -1, 0], [1, 2, 100]], dtype)
    got = GeneratedCBackend.run_model(_one_node(op, dtype), [x])[0]
    with np.errstate(all="ignore"):  # sqrt(-1) and exp(100) in half are the edge cases meant
        expected = fn(x.astype(np.float32)).astype(dtype) if dtype == np.float16 else fn(x)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(("op", "dtype"), [("Sqrt", np.int32), ("Exp", np.int64), ("Floor", np.int8), ("Not", np.float32)])
def test_unary_math_on_types_it_does_not_compute_is_refused(op: str, dtype) -> None:
    assert not GeneratedCBackend.is_compatible(_one_node(op, dtype))


def test_int64_compares_and_casts_are_exact_above_2_to_the_53() -> None:
    """Token ids and hashes are int64: compared or cast through a double, 2**53 + 1 == 2**53."""
    big = np.array([2**53, 2**53 + 1, -(2**62) - 1], np.int64)
    x, y = (onnx.helper.make_tensor_value_info(n, onnx.TensorProto.INT64, [3]) for n in ("x", "y"))
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Equal", ["x", "y"], ["eq"]), onnx.helper.make_node("Less", ["x", "y"], ["lt"]),
         onnx.helper.make_node("Cast", ["x"], ["c"], to=onnx.TensorProto.INT32)], "g", [x, y],
        [onnx.helper.make_tensor_value_info("eq", onnx.TensorProto.BOOL, [3]),
         onnx.helper.make_tensor_value_info("lt", onnx.TensorProto.BOOL, [3]),
         onnx.helper.make_tensor_value_info("c", onnx.TensorProto.INT32, [3])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 19)])
    other = big + np.array([1, 0, 0], np.int64)
    eq, lt, cast = GeneratedCBackend.run_model(model, {"x": big, "y": other})
    np.testing.assert_array_equal(eq, big == other)
    np.testing.assert_array_equal(lt, big < other)
    np.testing.assert_array_equal(cast, big.astype(np.int32))  # wraps, as ONNX Runtime and numpy do


def test_run_node_types_outputs_by_inference() -> None:
    """``Backend.run_node``: a bare node, typed from its input arrays and onnx's shape inference."""
    x = np.arange(30, dtype=np.float32).reshape(2, 15)
    node = onnx.helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3)
    got = GeneratedCBackend.run_node(node, [x], opset_version=18)
    assert [g.shape for g in got] == [(2, 5)] * 3
    for g, e in zip(got, np.split(x, 3, axis=1)):
        np.testing.assert_array_equal(g, e)
    det = onnx.helper.make_node("Det", ["x"], ["y"])
    with pytest.raises(BackendUnsupported, match="no C kernel for Det"):
        GeneratedCBackend.run_node(det, [x[:, :2]])


def test_integer_reductions_are_exact_and_empty_ones_give_the_type_identity() -> None:
    """int64 sums exact above 2**53, an integer mean truncates (ONNX's reference casts np.mean), and
    ReduceMax over an empty axis of an int32 gives int32's minimum, not int64's wrapped."""
    x = np.array([[2**53, 1], [-5, 0]], np.int64)
    models = {}
    for op, elem, shape in (("ReduceSum", onnx.TensorProto.INT64, [2, 2]), ("ReduceMean", onnx.TensorProto.INT64, [2, 2]),
                            ("ReduceMax", onnx.TensorProto.INT32, [2, 0])):
        graph = onnx.helper.make_graph(
            [onnx.helper.make_node(op, ["x", "axes"], ["y"], keepdims=0)], op,
            [onnx.helper.make_tensor_value_info("x", elem, shape)], [onnx.helper.make_tensor_value_info("y", elem, [2])],
            [onnx.numpy_helper.from_array(np.array([1], np.int64), "axes")])
        models[op] = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    np.testing.assert_array_equal(GeneratedCBackend.run_model(models["ReduceSum"], [x])[0], [2**53 + 1, -5])
    np.testing.assert_array_equal(GeneratedCBackend.run_model(models["ReduceMean"], [x])[0], [(2**53 + 1) // 2, -2])
    empty = GeneratedCBackend.run_model(models["ReduceMax"], [np.zeros((2, 0), np.int32)])[0]
    assert empty.dtype == np.int32
    np.testing.assert_array_equal(empty, [np.iinfo(np.int32).min] * 2)
