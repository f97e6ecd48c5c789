"""The EAGLE proposer end to end on stories260K: greedy output with a draft trained for a few
seconds (accepted guesses) and with a random draft (rejected ones) equals plain greedy decoding
token for token, alone (the speculative loop on ONNX Runtime and the generated-C runtime, and
the public generate) and in a 16-request continuous batch; the proposer's cache follows the
sequence it is handed; a missing draft decodes plainly with the reason, a bad one is an error."""

from __future__ import annotations

import json

import numpy as np
import pytest

import infercc
from infercc.runtime.engine import Engine
from infercc.runtime.sampling import SamplingParams
from infercc.runtime.speculative.eagle import EagleProposer
from infercc.runtime.speculative.eagle_draft import DRAFT_FILE, expected_shapes, save_draft
from infercc.runtime.speculative.heads import HeadsError
from infercc.runtime.speculative.medusa import lm_head_shape
from tests.importers._models import STORIES, require
from tests.runtime.speculative.test_loop import STORY, forced
from tests.runtime.test_engine import all_blocks_back, run, tokens

TEXTS = ["Once upon a time, there was a little girl named Lily.", "Tom had a big red ball. He liked to",
         "One day, a cat went to the park.", "The sun was hot and the dog was sad.",
         "Sue and her mom went to the store to buy", "There was a bird in a tree. The bird"]


def random_draft(directory, compiled, seed: int = 0):
    """A draft layer of random weights for ``compiled`` proposing every guess (min_confidence 0)."""
    _, hidden = lm_head_shape(compiled.model)
    rng = np.random.default_rng(seed)
    weights = {name: (np.ones(shape) if name.endswith("norm.weight") else rng.standard_normal(shape) / np.sqrt(shape[-1]))
               for name, shape in expected_shapes(hidden, 2, 8, 2 * hidden).items()}
    return save_draft(directory, weights, num_attention_heads=2, head_dim=8, intermediate_size=2 * hidden,
                      min_confidence=0.0).parent


@pytest.fixture(scope="module")
def stories(tmp_path_factory) -> dict:
    """stories260K compiled for EAGLE on each backend, a draft trained on it for a few seconds
    (min_confidence 0: every guess proposed) and a random draft."""
    from infercc.train_eagle import train_eagle

    root = tmp_path_factory.mktemp("eagle")
    texts = root / "prompts.txt"
    texts.write_text("\n\n".join([STORY, *TEXTS]))
    out: dict = {}
    for backend in ("ort", "c"):
        compiled = infercc.compile(require(STORIES), backend=backend, speculation="eagle")
        if backend == "c" and compiled.runtime != "c":
            pytest.skip(f"the generated-C runtime is not available here: {compiled.runtime_reason}")
        out[backend] = compiled
    # (trained on the test prompts' own continuations, all but one held out: its guesses get accepted)
    summary = train_eagle(out["ort"], root / "trained", steps=60, lr=3e-3, seq_len=40, texts=texts, held_out=0.01,
                          threads=1, progress=False, log=lambda _: None)
    config = json.loads((root / "trained" / "config.json").read_text())
    (root / "trained" / "config.json").write_text(json.dumps({**config, "min_confidence": 0.0}))
    out["trained"], out["summary"] = root / "trained", summary
    out["random"] = random_draft(root / "random", out["ort"])
    return out


def with_draft(compiled, draft):
    compiled.config = compiled.config.replace(speculation_heads=str(draft))
    return compiled


@pytest.mark.parametrize("backend", ["ort", "c"])
def test_greedy_equals_plain_decoding_alone(stories, backend):
    compiled = stories[backend]
    prompts = [compiled.tokenizer.encode(t) for t in (STORY, TEXTS[1])]
    counts = {}
    for draft in ("trained", "random"):
        with_draft(compiled, stories[draft])
        total = np.zeros(2, int)
        for prompt in prompts:
            plain = compiled.generate(prompt, max_new_tokens=32, ignore_eos=True, speculation="off")
            spec = forced(compiled, "eagle", prompt, k=3, max_new_tokens=32, ignore_eos=True)
            assert spec.token_ids == plain.token_ids, (draft, prompt)
            total += (spec.speculation.proposed, spec.speculation.accepted)
        counts[draft] = total
        public = compiled.generate(prompts[0], max_new_tokens=32, ignore_eos=True, speculation="eagle")
        assert public.token_ids == compiled.generate(prompts[0], max_new_tokens=32, ignore_eos=True,
                                                     speculation="off").token_ids
        assert public.speculation_reason is None
    # both paths ran: the trained draft's guesses are accepted, the random one's mostly not
    trained, random = (c[1] / c[0] for c in (counts["trained"], counts["random"]))
    assert counts["trained"][1] > 0 and trained > 2 * random and counts["random"][0] > 2 * counts["random"][1], counts


@pytest.mark.parametrize("backend,layout,draft", [("c", "paged", "trained"), ("ort", "contiguous", "random")])
def test_greedy_equality_in_a_16_request_batch(stories, backend, layout, draft, monkeypatch):
    from infercc.runtime.speculative import eagle

    # (a draft layer is ~30% of this 260K-weight model: the depth policy would rarely speculate)
    monkeypatch.setattr(eagle, "_weight_count", lambda model: 1 << 40)
    compiled = with_draft(stories[backend], stories[draft])
    prompts = [compiled.tokenizer.encode(TEXTS[i % len(TEXTS)])[:4 + i] for i in range(16)]
    limits = [12 + (7 * i) % 17 for i in range(16)]
    alone = [compiled.generate(p, max_new_tokens=m, ignore_eos=True, speculation="off").token_ids
             for p, m in zip(prompts, limits)]
    eng = Engine(compiled, compiled.config.replace(kv_cache_layout=layout, speculation="eagle",
                                                   speculation_policy="fixed"))  # not timing-dependent
    for i, (prompt, m) in enumerate(zip(prompts, limits)):
        eng.add_request(str(i), prompt, SamplingParams(max_new_tokens=m, ignore_eos=True))
    assert tokens(run(eng), 16) == alone
    spec = eng.stats().speculation
    assert spec.proposed > 0 and not eng.stats().speculation_notes, spec
    if draft == "trained":
        assert spec.accepted > 0, spec
    all_blocks_back(eng)


def test_the_cache_follows_the_sequence_it_is_handed(stories):
    """Rows observed again replace the cached ones; a gap or a changed token starts the sequence
    over; the same length proposed twice gives the same guesses (nothing pending the second time)."""
    compiled = with_draft(stories["ort"], stories["random"])
    from infercc.runtime.speculative.eagle import make_eagle

    proposer, _ = make_eagle(compiled, compiled.config)
    assert isinstance(proposer, EagleProposer)
    rng = np.random.default_rng(0)
    hidden = proposer.draft.hidden
    tokens = [1, 5, 9, 3, 7, 2, 8]
    rows = rng.standard_normal((7, hidden)).astype(np.float32)
    params = SamplingParams()
    proposer.observe("a", 4, rows[2])  # the prompt [1, 5, 9] chose token 3 (state at position 2)
    first = proposer.propose("a", tokens[:4], 3, params)
    assert len(first.tokens) == 3 and proposer.propose("a", tokens[:4], 3, params) == first
    proposer.observe("a", 7, rows[3:6])  # a step emitting 3 tokens
    fresh = proposer.propose("a", tokens, 2, params)
    proposer.observe("b", 4, rows[2])
    proposer.observe("b", 7, rows[3:6])
    assert proposer.propose("b", tokens, 2, params) == fresh  # one row at a time or three: one cache
    proposer.observe("b", 6, rows[3:5] + 1.0)  # positions 3..4 seen again, differently
    assert proposer.propose("b", tokens[:6], 2, params).tokens
    assert proposer._states["b"].cache.length == 3  # positions 2..4, 3 and 4 from the new rows
    assert proposer.propose("a", tokens[:6] + [4], 2, params).tokens == []  # a cached token changed
    assert "a" not in proposer._states
    proposer.observe("c", 10, rows[:1])
    assert proposer.propose("c", list(range(10)), 2, params).tokens  # starts at its first state
    proposer.observe("c", 14, rows[:1])  # a gap: starts over from there
    assert proposer._states["c"].cache.base == 12
    proposer.release("c")
    assert "c" not in proposer._states


def test_a_missing_draft_decodes_plainly_and_a_bad_one_is_an_error(stories, tmp_path):
    compiled = stories["ort"]
    plain = compiled.generate(STORY, max_new_tokens=12, ignore_eos=True, speculation="off")
    for heads, reason in ((str(tmp_path / "nowhere"), "no EAGLE draft at"), (None, "Config.speculation_heads is None")):
        compiled.config = compiled.config.replace(speculation_heads=heads)
        with pytest.warns(RuntimeWarning, match=reason):
            result = compiled.generate(STORY, max_new_tokens=12, ignore_eos=True, speculation="eagle")
        assert result.token_ids == plain.token_ids and reason in result.speculation_reason
    bad = tmp_path / "bad"
    random_draft(bad, compiled)
    (bad / DRAFT_FILE).write_bytes((bad / DRAFT_FILE).read_bytes()[:100])
    compiled.config = compiled.config.replace(speculation_heads=str(bad))
    with pytest.raises(HeadsError, match="not a readable safetensors file"):
        compiled.generate(STORY, max_new_tokens=12, ignore_eos=True, speculation="eagle")
    unexposed = infercc.compile(require(STORIES), speculation_heads=str(stories["random"]))
    with pytest.warns(RuntimeWarning, match="no 'hidden_states' output"):
        result = unexposed.generate(STORY, max_new_tokens=12, ignore_eos=True, speculation="eagle")
    assert result.token_ids == plain.token_ids


@pytest.mark.parametrize("draft", ["trained"])
def test_a_session_sequence_equals_plain_decoding(stories, draft, monkeypatch):
    """Session sequences hand the proposer every accepted token's state too."""
    from infercc.runtime.speculative import eagle

    monkeypatch.setattr(eagle, "_weight_count", lambda model: 1 << 40)  # (see the batch test)
    compiled = with_draft(stories["ort"], stories[draft])
    prompt = compiled.tokenizer.encode(STORY)
    expected = compiled.generate(prompt, max_new_tokens=24, ignore_eos=True, speculation="off").token_ids
    with compiled.session() as session:
        seq = session.sequence(speculation="eagle")
        seq.prefill(prompt)
        assert [seq.decode() for _ in range(24)] == expected
        assert seq.speculation.proposed > 0, seq.speculation  # (the depth policy decides how often)


@pytest.mark.slow  # (a C build of the tree graph)
def test_trees_in_a_16_request_batch_equal_plain_decoding(stories, monkeypatch):
    """Width 2 on the C paged runner: trees of the draft's top candidates, verified with tree
    attention, give each request's plain greedy tokens."""
    from infercc.runtime.speculative import eagle, tree

    monkeypatch.setattr(eagle, "_weight_count", lambda model: 1 << 40)
    monkeypatch.setattr(tree, "MIN_SIBLING", 0.0)  # (siblings however unlikely: every row a tree)
    compiled = with_draft(stories["c"], stories["trained"])
    prompts = [compiled.tokenizer.encode(TEXTS[i % len(TEXTS)])[:4 + i] for i in range(16)]
    alone = [compiled.generate(p, max_new_tokens=20, ignore_eos=True, speculation="off").token_ids for p in prompts]
    eng = Engine(compiled, compiled.config.replace(kv_cache_layout="paged", speculation="eagle",
                                                   speculation_policy="latency", speculation_tree_width=2))
    trees: list = []
    step = eng.runner.step
    eng.runner.step = lambda rows: (trees.extend(r.tree for r in rows if r.tree is not None), step(rows))[1]
    for i, prompt in enumerate(prompts):
        eng.add_request(str(i), prompt, SamplingParams(max_new_tokens=20, ignore_eos=True))
    assert tokens(run(eng), 16) == alone
    spec = eng.stats().speculation
    assert spec.accepted > 0 and not eng.stats().speculation_notes, spec
    assert any(p != i - 1 for row in trees for i, p in enumerate(row)), "no tree had a branch"
    all_blocks_back(eng)
