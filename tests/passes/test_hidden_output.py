"""The expose_hidden_state pass: with speculation="medusa" the graph gains ``hidden_states`` (the LM
head's input, at the logits' positions) and its logits stay exactly what they were; without it, or
on a graph with no norm before the LM head, nothing changes and the record says why."""

from __future__ import annotations

import numpy as np

import infercc
from infercc.runtime.model_runner import ModelRunner
from tests.runtime._cached_model import tiny_lm
from tests.runtime._hf_models import write_hf


def _step(compiled, tokens):
    runner = ModelRunner(compiled.backend, compiled.model)
    hidden: list[np.ndarray] = []
    logits = runner.step(runner.new_cache(1), [tokens], all_logits=True, hidden=hidden)
    return logits, hidden


def test_the_output_is_added_and_the_logits_do_not_change(tmp_path):
    source = write_hf(tmp_path / "llama", "llama")
    plain = infercc.compile(source, quantize=None)
    exposed = infercc.compile(source, quantize=None, speculation="medusa")
    record = exposed.diagnostics["expose_hidden_state"]
    assert record.status == "applied"
    assert [o["name"] for o in exposed.outputs] == [o["name"] for o in plain.outputs] + ["hidden_states"]
    tokens = [1, 5, 9, 3, 7]
    want, none = _step(plain, tokens)
    got, hidden = _step(exposed, tokens)
    assert np.array_equal(got, want) and none == []
    weight = next(v for v in exposed.model.graph.initializers.values() if v.name == "lm_head.weight").const.numpy()
    assert hidden[0].shape == (1, len(tokens), weight.shape[0])
    np.testing.assert_allclose(hidden[0][0] @ weight, got[0], rtol=1e-4, atol=1e-5)
    assert plain.diagnostics["expose_hidden_state"].status == "skipped"


def test_a_graph_without_a_final_norm_keeps_its_outputs():
    compiled = infercc.compile(tiny_lm(cached=True), speculation="medusa")
    record = compiled.diagnostics["expose_hidden_state"]
    assert record.status == "skipped" and "no final norm" in "; ".join(record.reasons)
    assert "hidden_states" not in [o["name"] for o in compiled.outputs]
