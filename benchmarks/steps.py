"""The timed units shared by the graph-level cases: one forward of a prompt (prefill) and one
decoding step after a cached past, on a bare onnxruntime session, so that what is compared is the
graph and its kernels, not a runtime around them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def session(model: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def prefill_feeds(sess, batch: int, seq: int) -> dict[str, np.ndarray]:
    """Seeded token ids, an all-ones mask and, for infercc's cached graphs, an empty cache
    [batch, kv_heads, 0, head]: prefill starts from nothing."""
    return _feeds(sess, batch, seq, past=0)


def step_feeds(sess, past: int) -> dict[str, np.ndarray]:
    """One new token of batch 1 after ``past`` cached random keys and values."""
    return _feeds(sess, 1, 1, past=past)


def _feeds(sess, batch: int, seq: int, past: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values."):
            dtype = np.float16 if "float16" in inp.type else np.float32
            feeds[inp.name] = rng.standard_normal((batch, inp.shape[1], past, inp.shape[3])).astype(dtype)
        elif "mask" in inp.name:
            feeds[inp.name] = np.ones((batch, past + seq), np.int64)
        else:
            feeds[inp.name] = rng.integers(0, 1000, (batch, seq)).astype(np.int64)
    return feeds


def setup_prefill(threads: int, model: str, batch: int, seq: int) -> tuple[Callable[[], Any], dict]:
    sess = session(model, threads)
    feeds = prefill_feeds(sess, batch, seq)
    return (lambda: sess.run(None, feeds)), {}


def setup_step(threads: int, model: str, past: int) -> tuple[Callable[[], Any], dict]:
    import onnx

    sess = session(model, threads)
    feeds = step_feeds(sess, past)
    nodes = len(onnx.load(model, load_external_data=False).graph.node)
    return (lambda: sess.run(None, feeds)), {"nodes": nodes}
