"""Sessions on the generated-C runtime keep their KV cache in shared buffers the attention appends
to in place (kv_cache.CacheSpec.rows_only, codegen icc_run's rooms): no past row is copied per
step, and every result equals ONNX Runtime's on the same weights -- prefill, single steps, a
left-padded batch, a rollback (speculation's truncate) and the buffers' growth mid-sequence."""

from __future__ import annotations

import numpy as np
import pytest

import infercc
import infercc.codegen.library as library_module
from infercc.codegen.library import rows_of_room
from tests.fuzz.synthetic import write_tiny_gguf

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19]]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[infercc.CompiledModel, infercc.CompiledModel]:
    path = write_tiny_gguf(tmp_path_factory.mktemp("c_cache") / "tiny.gguf", context=256)
    c = infercc.compile(path, backend="c")
    if c.runtime != "c":
        pytest.skip(f"the generated-C runtime is not available here: {c.runtime_reason}")
    return c, infercc.compile(path, backend="ort")


@pytest.fixture
def copies(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The shapes of the rank-4 arrays (K/V caches) the library copies a run's output into."""
    seen: list[tuple[int, ...]] = []
    real = np.copyto

    def spy(dst, src, *args, **kwargs):
        if np.ndim(dst) == 4:
            seen.append(np.shape(dst))
        return real(dst, src, *args, **kwargs)

    monkeypatch.setattr(library_module.np, "copyto", spy)
    return seen


def test_a_c_session_appends_in_place_and_equals_onnx_runtime(pair, copies):
    c, ort = pair
    assert c.backend.grows_in_place and all(name.startswith("past_key_values.") for name in c.backend.grows_in_place)
    with c.session() as sc, ort.session() as so:
        assert sc.runner.cache_spec.rows_only and not so.runner.cache_spec.rows_only
        a, b = sc.sequence(), so.sequence()
        np.testing.assert_allclose(a.prefill(PROMPTS[2]), b.prefill(PROMPTS[2]), atol=1e-4)
        for _ in range(70):  # past the first 64 slots: the buffers double mid-sequence
            assert a.decode() == b.decode()
            np.testing.assert_allclose(a.logits, b.logits, atol=1e-4)
        np.testing.assert_allclose(a.append([3, 4, 5], all_logits=True), b.append([3, 4, 5], all_logits=True), atol=1e-4)
    assert copies == []  # every present was the cache's own buffer


def test_rollback_and_a_padded_batch_on_in_place_buffers(pair, copies):
    c, ort = pair
    rc, ro = c.session().runner, ort.session().runner
    cc, co = rc.new_cache(len(PROMPTS)), ro.new_cache(len(PROMPTS))
    np.testing.assert_allclose(rc.step(cc, PROMPTS), ro.step(co, PROMPTS), atol=1e-4)
    steps = [[[1], [], [2]], [[3, 4], [5, 6], [7, 8]], [[9], [9], [9]]]
    for tokens in steps:
        np.testing.assert_allclose(rc.step(cc, tokens), ro.step(co, tokens), atol=1e-4)
    keep = cc.length - 3  # speculation's rollback: the last step's slots and one before are dropped
    cc.truncate(keep), co.truncate(keep)
    np.testing.assert_allclose(rc.step(cc, [[4], [4], [4]]), ro.step(co, [[4], [4], [4]]), atol=1e-4)
    assert [cc.tokens(i) for i in range(3)] == [co.tokens(i) for i in range(3)]
    assert copies == []


def test_only_a_view_of_a_bigger_buffer_is_taken_with_room():
    buffer = np.zeros((2, 3, 16, 4), np.float32)
    assert rows_of_room(buffer[:, :, :5], np.dtype(np.float32)) == 16
    assert rows_of_room(buffer[:1, :, :5], np.dtype(np.float32)) == 16
    assert rows_of_room(buffer, np.dtype(np.float32)) == 0  # dense: no room
    assert rows_of_room(buffer[:, :, :5], np.dtype(np.float16)) == 0  # not the cache's type
    assert rows_of_room(buffer[:1, :2, :5], np.dtype(np.float32)) == 16  # one row of fewer heads
    assert rows_of_room(buffer[:, :2, :5], np.dtype(np.float32)) == 0  # two: batches not heads x room apart
    assert rows_of_room(buffer[:, :, :5, :2], np.dtype(np.float32)) == 0  # rows not contiguous
    assert rows_of_room(buffer[:, :, ::2], np.dtype(np.float32)) == 0
    assert rows_of_room(np.zeros((4, 3, 16, 4), np.float32)[::2, :, :5], np.dtype(np.float32)) == 0  # batches 2 apart
    assert rows_of_room(buffer[:, :, :0], np.dtype(np.float32)) == 16  # an empty past: the new rows go in place
    assert rows_of_room(buffer.transpose(1, 0, 2, 3)[:, :, :5], np.dtype(np.float32)) == 0
    assert rows_of_room([[1.0]], np.dtype(np.float32)) == 0
