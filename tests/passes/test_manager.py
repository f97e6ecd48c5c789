"""The pass manager: failing, invalid and wrong passes are rolled back and recorded; compilation
goes on; strict mode re-raises; requirements between passes; diagnostics rendering."""

from __future__ import annotations

import json

import numpy as np
import pytest

import infercc
from infercc.ir import DType, Value
from infercc.passes import Diagnostics, Pass, PassManager, PassRecord
from infercc.passes.cleanup import ConstantFolding, DeadCodeElimination, NoOpElimination
from infercc.passes.diagnostics import Site

from ._build import assert_same_outputs, init, make, node, ops, ort_run, to_ir, vi

X = (np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5) / 2


def _proto():
    """y = Relu(x * (c1 + c2)) + dead code, so the cleanup passes have work to do."""
    return make(
        [
            node("Add", ["c1", "c2"], ["c"]),
            node("Mul", ["x", "c"], ["m"]),
            node("Relu", ["m"], ["r"]),
            node("Identity", ["r"], ["y"]),
            node("Exp", ["x"], ["dead"]),
        ],
        [vi("x", [2, 3])], [vi("y", [2, 3])],
        [init("c1", np.float32(1.5)), init("c2", np.float32(0.5))],
    )


def _expected(feeds=None):
    return ort_run(_proto(), feeds or {"x": X})


class Boom(Pass):
    """Damages the graph, records a change, then raises."""

    name = "boom"

    def run(self, model, ctx):
        relu = next(n for n in model.graph.nodes if n.op_type == "Relu")
        relu.op_type = "Sigmoid"
        ctx.record.applied("Relu", "nodes_changed")
        raise RuntimeError("kaboom\nwith a second line")


class Dangling(Pass):
    """Leaves a node reading a value defined nowhere."""

    name = "dangling"

    def run(self, model, ctx):
        ghost = Value("ghost", DType.FLOAT, (2, 3))
        relu = next(n for n in model.graph.nodes if n.op_type == "Relu")
        relu.set_input(0, ghost)
        ctx.record.count("inputs_rewired")


class RemovesUsedNode(Pass):
    name = "removes_used_node"

    def run(self, model, ctx):
        mul = next(n for n in model.graph.nodes if n.op_type == "Mul")
        model.graph.remove(mul, force=True)
        ctx.record.count("nodes_removed")


class MakesCycle(Pass):
    name = "makes_cycle"

    def run(self, model, ctx):
        mul = next(n for n in model.graph.nodes if n.op_type == "Mul")
        relu = next(n for n in model.graph.nodes if n.op_type == "Relu")
        mul.set_input(0, relu.outputs[0])
        ctx.record.count("inputs_rewired")


class ReluToSigmoid(Pass):
    """Deliberately wrong: runs fine, leaves a valid graph, changes the numbers."""

    name = "relu_to_sigmoid"

    def __init__(self, record_change: bool = True):
        self.record_change = record_change

    def run(self, model, ctx):
        for n in model.graph.nodes:
            if n.op_type == "Relu":
                n.op_type = "Sigmoid"
                if self.record_change:
                    ctx.record.applied(n.name or "Relu")


class Ensures(Pass):
    name = "ensures_fused"
    ensures = frozenset({"fused"})

    def run(self, model, ctx):
        pass


class NeedsFused(Pass):
    name = "needs_fused"
    requires = frozenset({"fused"})
    ran = 0

    def run(self, model, ctx):
        NeedsFused.ran += 1
        ctx.record.count("ran")


class FailsAndEnsures(Boom):
    name = "fails_and_ensures"
    ensures = frozenset({"fused"})


def _compile(passes, **options):
    return infercc.compile(_proto(), passes=passes, provider="cpu", **options)


# ------------------------------------------------------------------------------------ rollback
def test_pass_that_raises_is_rolled_back_and_compilation_goes_on():
    compiled = _compile([ConstantFolding(), Boom(), NoOpElimination(), DeadCodeElimination()])
    rec = compiled.diagnostics["boom"]
    assert rec.status == "failed"
    assert rec.changes == {}
    assert rec.reasons[0] == "rolled back: RuntimeError: kaboom"
    assert "Traceback" in rec.info["traceback"]
    assert not [s for s in rec.sites if s.status == "applied"]
    # later passes ran on the restored graph
    assert compiled.diagnostics["noop_elimination"].status == "applied"
    assert compiled.diagnostics["dead_code_elimination"].status == "applied"
    assert "Sigmoid" not in ops(compiled.model)
    assert ops(compiled.model) == ["Mul", "Relu"]
    assert_same_outputs(_expected(), compiled.run({"x": X}))


@pytest.mark.parametrize("bad", [Dangling, RemovesUsedNode, MakesCycle])
def test_pass_leaving_an_invalid_graph_is_rolled_back(bad):
    compiled = _compile([bad(), DeadCodeElimination()])
    rec = compiled.diagnostics[bad.name]
    assert rec.status == "failed" and rec.changes == {}
    assert rec.reasons[0].startswith("rolled back: ")
    assert compiled.diagnostics["dead_code_elimination"].status == "applied"
    infercc.ir.verify(compiled.model)
    assert_same_outputs(_expected(), compiled.run({"x": X}))


def test_dangling_input_reason_names_the_value():
    compiled = _compile([Dangling()])
    assert "VerifyError" in compiled.diagnostics["dangling"].reasons[0]
    assert "ghost" in compiled.diagnostics["dangling"].reasons[0]


@pytest.mark.parametrize("bad", [Boom, Dangling])
def test_strict_reraises_as_pass_error(bad):
    with pytest.raises(infercc.PassError, match=bad.name) as info:
        _compile([ConstantFolding(), bad(), DeadCodeElimination()], strict=True)
    assert info.value.__cause__ is not None
    assert isinstance(info.value, infercc.InferccError)


def test_strict_with_good_passes_compiles():
    compiled = _compile([ConstantFolding(), NoOpElimination(), DeadCodeElimination()], strict=True)
    assert all(r.status == "applied" for r in compiled.diagnostics)


# ---------------------------------------------------------------------------- numeric check
@pytest.mark.parametrize("record_change", [True, False], ids=["recorded", "silent"])
def test_check_each_pass_rolls_back_a_pass_that_changes_numbers(record_change):
    compiled = _compile([ConstantFolding(), ReluToSigmoid(record_change), DeadCodeElimination()], check_each_pass=True)
    rec = compiled.diagnostics["relu_to_sigmoid"]
    assert rec.status == "failed"
    assert "NumericMismatch" in rec.reasons[0] and "outputs changed" in rec.reasons[0]
    assert "Sigmoid" not in ops(compiled.model)
    assert compiled.diagnostics["constant_folding"].status == "applied"
    assert compiled.diagnostics["dead_code_elimination"].status == "applied"
    assert_same_outputs(_expected(), compiled.run({"x": X}))


def test_without_check_a_wrong_pass_goes_unnoticed():
    """The reason check_each_pass exists: a wrong-but-valid rewrite is not caught otherwise."""
    compiled = _compile([ReluToSigmoid()])
    assert compiled.diagnostics["relu_to_sigmoid"].status == "applied"
    assert not np.allclose(compiled.run({"x": X})["y"], _expected()["y"])


def test_check_each_pass_keeps_correct_passes():
    compiled = infercc.compile(_proto(), check_each_pass=True, provider="cpu")
    assert [r.status for r in compiled.diagnostics if r.status == "failed"] == []
    assert_same_outputs(_expected(), compiled.run({"x": X}))


def test_check_tolerance_is_used():
    class Nudge(Pass):
        name = "nudge"

        def run(self, model, ctx):
            c = model.graph.initializers["c1"]
            c.const = infercc.ir.Tensor(np.float32(1.5 + 1e-3))
            ctx.record.count("constants_changed")

    loose = _compile([Nudge()], check_each_pass=True, check_tolerance=0.1)
    assert loose.diagnostics["nudge"].status == "applied"
    tight = _compile([Nudge()], check_each_pass=True, check_tolerance=1e-6)
    assert tight.diagnostics["nudge"].status == "failed"


# ------------------------------------------------------------------------------ requirements
def test_unmet_requirement_skips_with_reason():
    NeedsFused.ran = 0
    compiled = _compile([NeedsFused()])
    rec = compiled.diagnostics["needs_fused"]
    assert rec.status == "skipped" and NeedsFused.ran == 0
    assert rec.reasons == ["requires fused, which no earlier pass established"]


def test_met_requirement_runs():
    NeedsFused.ran = 0
    compiled = _compile([Ensures(), NeedsFused()])
    assert NeedsFused.ran == 1
    assert compiled.diagnostics["needs_fused"].status == "applied"


def test_failed_pass_establishes_nothing():
    NeedsFused.ran = 0
    compiled = _compile([FailsAndEnsures(), NeedsFused()])
    assert compiled.diagnostics["fails_and_ensures"].status == "failed"
    assert compiled.diagnostics["needs_fused"].status == "skipped" and NeedsFused.ran == 0


# ------------------------------------------------------------------------------ callbacks etc.
def test_on_pass_is_called_in_order():
    seen = []
    infercc.compile(_proto(), on_pass=lambda p, r: seen.append((p.name, r.status)), provider="cpu")
    assert [name for name, _ in seen] == infercc.passes.pass_names()
    assert all(status in ("applied", "skipped") for _, status in seen)


def test_manager_runs_directly_and_records_seconds():
    model = to_ir(_proto())
    model, diagnostics = PassManager([ConstantFolding(), Boom()], infercc.Config()).run(model)
    assert [r.pass_name for r in diagnostics] == ["constant_folding", "boom"]
    assert all(r.seconds > 0 for r in diagnostics)


def test_empty_pipeline():
    compiled = _compile([])
    assert len(compiled.diagnostics) == 0
    assert_same_outputs(_expected(), compiled.run({"x": X}))


# --------------------------------------------------------------------------------- rendering
def _diagnostics():
    return _compile([ConstantFolding(), Boom(), NeedsFused(), NoOpElimination(), DeadCodeElimination()]).diagnostics


def test_table_lists_every_pass():
    diagnostics = _diagnostics()
    table = diagnostics.table()
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["pass", "status", "changes", "time", "reasons"]
    for r in diagnostics:
        row = next(line for line in lines if line.startswith(r.pass_name + " "))
        assert r.status in row
    assert "rolled back: RuntimeError: kaboom" in table
    assert "requires fused" in table
    assert "nodes_folded=1" in table
    assert str(diagnostics) == table
    assert "family:" in table  # facts follow the table
    sites = diagnostics.table(sites=True)
    assert len(sites.splitlines()) >= len(lines)


def test_many_changes_wrap_and_keep_every_count():
    record = PassRecord("lowering")
    kinds = {f"Op{i}_lowered_ort": i + 1 for i in range(8)}
    for kind, n in kinds.items():
        record.count(kind, n)
    record.note("one reason")
    lines = Diagnostics([record]).table().splitlines()[2:]
    assert len(lines) > 1 and lines[0].startswith("lowering") and lines[0].rstrip().endswith("one reason")
    width = lines[0].index("ms") + 2
    assert all(len(line.rstrip()) <= width for line in lines[1:])  # continuation rows stay in the columns
    text = "\n".join(lines)
    assert all(f"{kind}={n}" in text for kind, n in kinds.items())


def test_table_of_nothing():
    assert Diagnostics().table().splitlines()[0].startswith("pass")


def test_to_json_has_the_documented_fields():
    diagnostics = _diagnostics()
    data = json.loads(diagnostics.to_json())
    assert set(data) == {"facts", "passes"}
    assert [p["pass"] for p in data["passes"]] == [r.pass_name for r in diagnostics]
    for p in data["passes"]:
        assert {"pass", "status", "changes", "reasons", "seconds"} <= set(p)
        assert isinstance(p["changes"], dict) and isinstance(p["reasons"], list) and isinstance(p["seconds"], float)
    boom = next(p for p in data["passes"] if p["pass"] == "boom")
    assert boom["status"] == "failed" and boom["reasons"][0].startswith("rolled back")


def test_diagnostics_round_trip_through_dicts():
    diagnostics = _diagnostics()
    again = Diagnostics.from_dict(json.loads(diagnostics.to_json()))
    assert again == diagnostics
    assert again.to_json() == diagnostics.to_json()


def test_record_api():
    r = PassRecord("p")
    r.count("a", 0)
    r.finish()
    assert r.status == "skipped" and r.reasons == ["nothing to do: no site matched"]
    r = PassRecord("p")
    r.applied("n1")
    r.skipped("n2", "because")
    r.skipped("n3", "because")
    r.skipped("n4", "other")
    r.warn("careful")
    r.warn("careful")
    r.note("note")
    r.note("note")
    r.finish()
    assert r.status == "applied" and r.changes == {"sites_changed": 1}
    assert r.reasons == ["note", "2 site(s) skipped: because", "1 site skipped: other"]
    assert r.warnings == ["careful"]
    assert r.sites[0] == Site("n1", "applied")
    d = Diagnostics([r])
    assert d.warnings == ["p: careful"]
    with pytest.raises(KeyError, match="no pass named"):
        d["nope"]


def test_diagnostics_equality_survives_json():
    r = PassRecord("p", info={"sites": [("a", 1)], "shape": (2, 3)})
    d = Diagnostics([r], {"dims": (1, 2)})
    again = Diagnostics.from_dict(json.loads(d.to_json()))
    assert again == d
    assert d != Diagnostics([PassRecord("q")])
    assert d != "diagnostics"
