"""``logits_to_keep``: the cached graph's optional scalar that limits the LM head to the last n
positions (0, the default, keeps them all), on every decoder fixture and a real checkpoint."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import infercc
from infercc.ir import to_proto
from tests.importers._models import STORIES, require

from ._drive import DECODERS, empty_pasts, fixture, sequence, session


@pytest.mark.parametrize("name", DECODERS)
def test_kept_logits_are_the_last_positions_of_all(name: str) -> None:
    cm = fixture(name)
    assert "logits_to_keep" in cm.diagnostics["kv_cache_insertion"].info["logits_to_keep"]
    sess = session(cm)
    ids, mask, _ = sequence(cm.model.graph.outputs[0].shape[-1], [5, 3], 0)
    feeds = {"input_ids": ids, "attention_mask": mask, **empty_pasts(sess, 2)}
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}}
    full = sess.run(["logits"], feeds)[0]
    assert full.shape[1] == 5  # not fed: every position
    assert np.array_equal(sess.run(["logits"], {**feeds, "logits_to_keep": np.asarray(0, np.int64)})[0], full)
    for keep in (1, 3, 9):
        kept = sess.run(["logits"], {**feeds, "logits_to_keep": np.asarray(keep, np.int64)})[0]
        assert kept.shape[1] == min(keep, 5)
        np.testing.assert_allclose(kept, full[:, -min(keep, 5):], rtol=0, atol=1e-5)


def test_the_artifact_declares_an_int64_scalar_defaulting_to_zero() -> None:
    proto = to_proto(fixture("llama_dynamo").model)
    declared = {i.name: i for i in proto.graph.input}["logits_to_keep"]
    assert declared.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert len(declared.type.tensor_type.shape.dim) == 0
    default = {t.name: t for t in proto.graph.initializer}["logits_to_keep"]
    assert int(onnx.numpy_helper.to_array(default)) == 0


def test_session_prompt_logits_equal_with_and_without_the_slice() -> None:
    """The runner feeds 1 for a prompt (last position) and 0 for all_logits: both agree."""
    path = require(STORIES)
    cm = infercc.compile(path, quantize=None)
    prompt = [1, 403, 407, 261, 378, 375, 289]
    last = cm.session().sequence().prefill(prompt)
    every = cm.session().sequence().prefill(prompt, all_logits=True)
    assert every.shape[0] == len(prompt)
    np.testing.assert_allclose(last, every[-1], rtol=0, atol=1e-5)
