"""Per-step timers of the generated C: compiled in only with -DICC_PROFILE (the plain library has no
timer code and no ``icc_profile``), warning-free, and their times consistent with the run's; the
step table's op types and layers."""

from __future__ import annotations

import numpy as np
import pytest

import infercc
from infercc.codegen.build import NATIVE, PROFILE, build, warnings_of
from infercc.codegen.profile import NO_LAYER, layer_in, layer_table
from infercc.runtime.c_backend import CBackend
from infercc.runtime.feeds import check_feeds
from tests.fixtures import catalog


@pytest.fixture(scope="module")
def llama() -> infercc.CompiledModel:
    compiled = infercc.compile(catalog.fixture_path("llama_dynamo"), backend="c")
    assert compiled.runtime == "c", compiled.runtime_reason
    return compiled


def test_timers_only_in_the_profile_build(llama) -> None:
    plain = CBackend(llama.model, intra_op_threads=1)
    profiled = CBackend(llama.model, intra_op_threads=1, profile=True)
    assert plain.source == profiled.source  # one source: the flag decides
    plain_so = build(plain.source).read_bytes()
    profiled_so = build(plain.source, NATIVE + (PROFILE,)).read_bytes()
    assert b"icc_profile" not in plain_so and b"clock_gettime" not in plain_so
    assert b"icc_profile" in profiled_so and b"clock_gettime" in profiled_so
    assert not hasattr(plain.library.lib, "icc_profile")
    assert warnings_of(plain.source, NATIVE + (PROFILE,)) == []


def test_step_times_add_up_to_the_run(llama) -> None:
    backend = CBackend(llama.model, intra_op_threads=1, profile=True)
    feeds = check_feeds(llama.model.graph, catalog.random_feeds("llama_dynamo", 1, 12, padding=False, seed=2))
    expected = CBackend(llama.model, intra_op_threads=1).run(feeds)
    starts = []
    for _ in range(2):
        got = backend.run(feeds)
        times = backend.library.last_times
        assert times is not None
        starts.append(times.start_ns)
        steps = len(backend.program.steps)
        assert len(times.step_ns) == steps == len(llama.model.graph.nodes)
        assert (times.step_ns >= 0).all() and (times.step_start_ns >= 0).all()
        assert (np.diff(times.step_start_ns) >= 0).all()  # steps run in order
        assert times.step_ns.sum() <= times.total_ns
        assert times.step_ns.sum() >= 0.8 * times.total_ns  # the steps are the run
        assert times.step_start_ns[-1] + times.step_ns[-1] <= times.total_ns
    # offsets from the library's first profiled run in this process (an earlier test may have
    # loaded the same built library: dlopen shares it, and its clock origin)
    assert 0 <= starts[0] < starts[1]
    for name in expected:  # timers change nothing computed
        np.testing.assert_array_equal(got[name], expected[name])


def test_step_table_names_op_types_and_layers(llama) -> None:
    steps = CBackend(llama.model, intra_op_threads=1).program.steps
    ops = {s["op"] for s in steps}
    assert "MatMul" in ops and "ai.infercc::Attention" in ops
    layers = {s["layer"] for s in steps}
    assert layers == {"layers.0", "layers.1", NO_LAYER}  # the fixture has two layers
    attention = [s["layer"] for s in steps if s["op"] == "ai.infercc::Attention"]
    assert attention == ["layers.0", "layers.1"]


@pytest.mark.parametrize(("name", "layer"), [
    ("/model/transformer/h.3/attn/MatMul", 3), ("model.layers.12.self_attn.q_proj.weight", 12),
    ("blocks_3/mlp", 3), ("blk.7.attn_q.weight", 7), ("past_key_values.2.key", 2),
    ("/model/encoder/layer.0/attention", 0), ("node_linear_3", None), ("model.norm.weight", None), ("", None)])
def test_layer_in_names(name: str, layer: int | None) -> None:
    assert layer_in(name) == layer


def test_layers_follow_the_data_when_names_say_nothing() -> None:
    """A dynamo export names nodes ``node_linear_3`` and weights ``val_73``: the layer comes from
    the cache inputs an Attention reads and flows through the data to every projection; the LM
    head, after the final norm (a checkpoint weight outside the layers), is in none."""
    compiled = infercc.compile(catalog.fixture_path("gpt2_dynamo"), backend="c")
    nodes = compiled.model.graph.nodes
    layer = dict(zip((id(n) for n in nodes), layer_table(nodes)))
    assert [layer[id(n)] for n in nodes if n.op_type == "Attention"] == ["layers.0", "layers.1"]
    head = next(n for n in nodes if any(v is not None and v.name == "logits" for v in n.outputs))
    assert layer[id(head)] == NO_LAYER
    matmuls = [layer[id(n)] for n in nodes if n.op_type in ("MatMul", "Gemm") and n is not head]
    assert matmuls and all(m != NO_LAYER for m in matmuls)
    assert {"layers.0", "layers.1"} <= set(matmuls)
