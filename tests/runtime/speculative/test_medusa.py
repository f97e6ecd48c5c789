"""Medusa heads end to end: greedy output with heads equals plain greedy decoding token for token
(whatever the heads' quality: random heads are rejected, heads fitted to the test prompts'
output are accepted, both paths run), alone on ONNX Runtime and the generated-C runtime and
inside a 16-request continuous batch on every runner form; the exposed hidden state is what the LM
head reads; heads that do not fit the model are a clear error; missing heads decode plainly with
the reason."""

from __future__ import annotations

import json

import numpy as np
import pytest

import infercc
from infercc.runtime.speculative.heads import HEADS_FILE, HeadsError, load_heads, save_heads
from infercc.runtime.speculative.medusa import lm_head_shape, lm_head_weights
from tests.fuzz.synthetic import write_tiny_gguf
from tests.runtime.speculative.test_loop import PROMPTS, forced
from tests.runtime.test_engine import all_blocks_back, run, tokens
from tests.runtime.test_engine_speculative import MAX_NEW, engine, submit
from tests.runtime.test_engine_speculative import PROMPTS as BATCH


def write_heads(directory, compiled, *, scale: float, heads: int = 3, own: bool = False, seed: int = 0):
    """Heads for ``compiled``: ResBlocks of random weights times ``scale`` (0: identity, so each
    head guesses the model's own next token again), sharing the LM head or with their own."""
    vocab, hidden = lm_head_weights(compiled.model).shape
    rng = np.random.default_rng(seed)
    blocks = [[(rng.standard_normal((hidden, hidden)).astype(np.float32) * scale, np.zeros(hidden, np.float32))]
              for _ in range(heads)]
    projections = [rng.standard_normal((vocab, hidden)).astype(np.float32) if own else None for _ in range(heads)]
    return save_heads(directory, blocks, projections, min_confidence=0.0).parent


def fitted_heads(directory, compiled, sequences, heads: int = 3):
    """Heads that know ``sequences`` [(prompt, continuation)]: identity ResBlocks and per head its
    own projection, the least-squares map from each hidden state to the one-hot of the token the
    head should guess (exact when there are fewer states than hidden dimensions)."""
    from infercc.train_heads import _collect

    features, labels = _collect(compiled, sequences, heads)
    x, y = np.concatenate(features), np.concatenate(labels)
    vocab, hidden = lm_head_weights(compiled.model).shape
    projections = []
    for i in range(heads):
        valid = y[:, i] >= 0
        target = np.eye(vocab, dtype=np.float32)[y[valid, i]]
        projections.append(np.linalg.lstsq(x[valid], target, rcond=None)[0].T.astype(np.float32))
    blocks = [[(np.zeros((hidden, hidden), np.float32), np.zeros(hidden, np.float32))] for _ in range(heads)]
    return save_heads(directory, blocks, projections, min_confidence=0.0).parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """The tiny random LLaMA GGUF compiled for Medusa on each backend, with heads fitted to the
    16 batch prompts' greedy output (in its config), and random heads."""
    root = tmp_path_factory.mktemp("medusa")
    gguf = write_tiny_gguf(root / "tiny.gguf")
    out = {}
    for backend in ("ort", "c"):
        compiled = infercc.compile(gguf, backend=backend, speculation="medusa")
        if backend == "c" and compiled.runtime != "c":
            pytest.skip(f"the generated-C runtime is not available here: {compiled.runtime_reason}")
        alone = [compiled.generate(p, max_new_tokens=m, ignore_eos=True, speculation="off").token_ids
                 for p, m in zip(BATCH, MAX_NEW)]
        out[backend, "alone"] = alone
        out[backend, "fitted"] = fitted_heads(root / f"{backend}-fitted", compiled, list(zip(BATCH, alone)))
        out[backend, "random"] = write_heads(root / f"{backend}-random", compiled, scale=0.3)
        compiled.config = compiled.config.replace(speculation_heads=str(out[backend, "fitted"]))
        out[backend] = compiled
    return out


def forced_heads(compiled, heads, prompt, k: int = 3, **options):
    """``forced`` with the heads in folder ``heads`` (the compiled model's own config otherwise)."""
    saved = compiled.config
    compiled.config = saved.replace(speculation_heads=str(heads))
    try:
        return forced(compiled, "medusa", prompt, k=k, **options)
    finally:
        compiled.config = saved


def test_the_hidden_output_is_what_the_lm_head_reads(tiny, tmp_path):
    from infercc.runtime.model_runner import ModelRunner

    for backend in ("ort", "c"):
        compiled = tiny[backend]
        assert compiled.diagnostics["expose_hidden_state"].status == "applied"
        runner = ModelRunner(compiled.backend, compiled.model)
        cache, hidden = runner.new_cache(1), []
        logits = runner.step(cache, [[1, 5, 9, 3]], all_logits=True, hidden=hidden)[0]
        assert hidden[0].shape[:2] == (1, 4)
        # (the quantized LM head multiplies int8-rounded activations on both runtimes: ~1% off)
        weight = lm_head_weights(compiled.model)
        error = np.abs(hidden[0][0] @ weight.T - logits).max()
        assert error <= 0.02 * np.abs(logits).max(), error
        assert lm_head_shape(compiled.model) == weight.shape
        assert np.array_equal(lm_head_weights(compiled.model, np.asarray([7, 0, 200])), weight[[7, 0, 200]])
        last = []
        runner.step(cache, [[7]], hidden=last)
        assert last[0].shape == (1, hidden[0].shape[-1])
    plain = infercc.compile(write_tiny_gguf(tmp_path / "plain.gguf"))
    assert "hidden_states" not in [o["name"] for o in plain.outputs]
    assert plain.diagnostics["expose_hidden_state"].status == "skipped"


@pytest.mark.parametrize("backend", ["ort", "c"])
def test_greedy_equals_plain_decoding_alone(tiny, backend):
    compiled = tiny[backend]
    counts = {}
    for heads in ("fitted", "random"):
        total = [0, 0]
        for prompt in BATCH[:4]:
            plain = compiled.generate(prompt, max_new_tokens=24, ignore_eos=True, speculation="off")
            spec = forced_heads(compiled, tiny[backend, heads], prompt, max_new_tokens=24, ignore_eos=True)
            assert spec.token_ids == plain.token_ids, (heads, prompt)
            assert spec.speculation.steps > 0
            total = [total[0] + spec.speculation.proposed, total[1] + spec.speculation.accepted]
        counts[heads] = total
    public = compiled.generate(BATCH[3], max_new_tokens=24, ignore_eos=True)  # the config's heads
    assert public.token_ids == plain.token_ids
    assert public.speculation_reason is None and public.speculation is not None
    # both paths ran: fitted heads are accepted, random ones mostly not
    assert counts["fitted"][1] > 0 and counts["random"][0] > counts["random"][1], counts


@pytest.mark.parametrize("backend,layout", [("ort", "paged"), ("c", "paged"), ("ort", "contiguous")])
def test_greedy_equality_in_a_16_request_batch(tiny, backend, layout):
    alone = tiny[backend, "alone"]
    eng = engine(tiny[backend], layout, speculation="medusa")
    submit(eng)
    outputs = run(eng)
    assert tokens(outputs, len(BATCH)) == alone
    spec = eng.stats().speculation
    assert spec.proposed > 0 and spec.accepted > 0, spec
    assert not eng.stats().speculation_notes
    all_blocks_back(eng)


def test_heads_with_their_own_projection_read_in_medusa_layout(tiny, tmp_path):
    compiled = tiny["ort"]
    directory = write_heads(tmp_path / "own", compiled, scale=0.1, heads=2, own=True)
    vocab, hidden = lm_head_weights(compiled.model).shape
    heads = load_heads(directory, hidden, vocab)
    assert heads.num_heads == 2 and heads.projections[0].shape == (vocab, hidden)
    plain = compiled.generate(PROMPTS[0], max_new_tokens=16, ignore_eos=True, speculation="off")
    spec = forced_heads(compiled, directory, PROMPTS[0], k=2, max_new_tokens=16, ignore_eos=True)
    assert spec.token_ids == plain.token_ids and spec.speculation.proposed > 0


def test_heads_that_do_not_fit_are_a_clear_error(tiny, tmp_path):
    from safetensors.numpy import save_file

    compiled = tiny["ort"]
    vocab, hidden = lm_head_weights(compiled.model).shape
    good = write_heads(tmp_path / "good", compiled, scale=0.1)
    cases = {
        "shape": ({"0.0.linear.weight": np.zeros((hidden + 1, hidden), np.float32),
                   "0.0.linear.bias": np.zeros(hidden, np.float32)}, "has shape"),
        "missing": ({"0.0.linear.weight": np.zeros((hidden, hidden), np.float32)}, "'0.0.linear.bias' is missing"),
        "stranger": ({"0.0.linear.weight": np.zeros((hidden, hidden), np.float32),
                      "0.0.linear.bias": np.zeros(hidden, np.float32), "lm_head.weight": np.zeros(2, np.float32)},
                     "not part of Medusa's head layout"),
        "nan": ({"0.0.linear.weight": np.full((hidden, hidden), np.nan, np.float32),
                 "0.0.linear.bias": np.zeros(hidden, np.float32)}, "NaN"),
        "dtype": ({"0.0.linear.weight": np.zeros((hidden, hidden), np.int32),
                   "0.0.linear.bias": np.zeros(hidden, np.float32)}, "dtype I32"),
    }
    for name, (tensors, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        save_file(tensors, str(folder / HEADS_FILE))
        (folder / "config.json").write_text(json.dumps({"shared_lm_head": True}))
        with pytest.raises(HeadsError, match=message):
            load_heads(folder, hidden, vocab)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / HEADS_FILE).write_bytes(b"\xff" * 8 + (good / HEADS_FILE).read_bytes()[8:200])
    with pytest.raises(HeadsError, match="not a readable safetensors file"):
        load_heads(corrupt, hidden, vocab)
    with pytest.raises(HeadsError, match="another model"):
        load_heads(good, hidden * 2, vocab)
    (good / "config.json").write_text(json.dumps({"medusa_num_heads": 5, "shared_lm_head": True}))
    with pytest.raises(HeadsError, match="declares 5 heads but the file holds 3"):
        load_heads(good, hidden, vocab)
    with pytest.raises(HeadsError, match="not a readable safetensors file"):  # a file that is there: an error
        forced_heads(compiled, corrupt, PROMPTS[0], max_new_tokens=4)


def test_missing_heads_decode_plainly_with_the_reason(tiny, tmp_path):
    gguf = write_tiny_gguf(tmp_path / "t.gguf")
    plain = tiny["ort"].generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True, speculation="off")
    for options, reason in (({"speculation_heads": str(tmp_path / "nowhere")}, "no Medusa heads at"),
                            ({}, "Config.speculation_heads is None")):
        compiled = infercc.compile(gguf, speculation="medusa", **options)
        with pytest.warns(RuntimeWarning, match=reason):
            result = compiled.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True)
        assert result.token_ids == plain.token_ids and reason in result.speculation_reason
    unexposed = infercc.compile(gguf, speculation_heads=str(tmp_path / "nowhere"))  # not compiled for heads
    with pytest.warns(RuntimeWarning, match="no 'hidden_states' output"):
        result = unexposed.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True, speculation="medusa")
    assert result.token_ids == plain.token_ids


@pytest.mark.parametrize("backend", [pytest.param("c", marks=pytest.mark.slow), "ort"])
def test_sparse_trees_in_a_16_request_batch(tiny, backend, monkeypatch):
    """Width 3: the heads' sparse trees are verified with tree attention, on the C paged runner and
    on ONNX Runtime's gather form (its tree variant, runtime/tree_ort.py): tree rows ran, tokens
    exact."""
    from infercc.runtime.speculative import tree

    monkeypatch.setattr(tree, "MIN_SIBLING", 0.0)  # (the fitted heads are sure: siblings however unlikely)
    alone = tiny[backend, "alone"]
    eng = engine(tiny[backend], "paged", speculation="medusa", speculation_tree_width=3)
    trees: list = []
    step = eng.runner.step
    eng.runner.step = lambda rows: (trees.extend(r.tree for r in rows if r.tree is not None), step(rows))[1]
    submit(eng)
    assert tokens(run(eng), len(BATCH)) == alone
    spec, notes = eng.stats().speculation, eng.stats().speculation_notes
    assert spec.proposed > 0 and spec.accepted > 0, spec
    assert eng.runner.form == ("c-paged" if backend == "c" else "ort-gather")
    assert not notes and any(p != i - 1 for tree in trees for i, p in enumerate(tree)), notes
    all_blocks_back(eng)


def test_sparse_trees_in_the_single_prompt_loop_on_onnx_runtime(tiny, monkeypatch):
    """Width 3, one prompt on ONNX Runtime: the loop verifies the heads' trees with the tree
    variant (runtime/tree_ort.py), tokens exact, the accepted path's K/V compacted in the cache."""
    from infercc.runtime.kv_cache import KVCache
    from infercc.runtime.model_runner import ModelRunner
    from infercc.runtime.speculative import DepthPolicy, loop, tree

    monkeypatch.setattr(tree, "MIN_SIBLING", 0.0)
    monkeypatch.setattr(loop, "DepthPolicy", lambda config, **_: DepthPolicy(config, fixed=4))  # (never off)
    compiled = tiny["ort"]
    saved = compiled.config
    compiled.config = saved.replace(speculation_tree_width=3)
    trees, moves = [], []
    step_tree, move = ModelRunner.step_tree, KVCache.move
    monkeypatch.setattr(ModelRunner, "step_tree", lambda self, cache, tokens, parents, *a: (
        trees.append(parents), step_tree(self, cache, tokens, parents, *a))[1])
    monkeypatch.setattr(KVCache, "move", lambda self, pairs: (moves.append(pairs), move(self, pairs))[1])
    try:
        for prompt, want in list(zip(BATCH, tiny["ort", "alone"]))[:3]:
            result = compiled.generate(prompt, max_new_tokens=len(want), ignore_eos=True)
            assert result.token_ids == want and result.speculation_reason is None
            assert result.speculation.accepted > 0
    finally:
        compiled.config = saved
    assert any(p != i - 1 for parents in trees for i, p in enumerate(parents)), trees
    assert any(moves)
