"""Trees of candidates on ONNX Runtime (runtime/tree_ort.py): the paged runner's ort-gather form
and the single-prompt speculative loop verify a tree row with the graph variant whose attention
biases read ``kv_tree_mask``.

* tree logits equal chain logits along each node's path within ``TOLERANCE`` (not bit for bit as
  on C: ORT's kernels sum a row of S queries in another order than a shorter chain row), and a
  broken tree mask (a node allowed to see its sibling) breaks that equality;
* after compaction, decoding goes on as if the accepted path had been a chain;
* greedy decoding with hand-built trees (the right branch second, wrong branches, all-wrong trees)
  is plain greedy decoding token for token: in the engine (a batch of requests) and in the loop;
* refusals say why (a sliding window, positions counted over the length).

Models on ONNX Runtime: random HF checkpoints -- a LLaMA with GQA heads of 16 (GroupQueryAttention,
rotary inside the kernel, positions by ``position_ids``) and a GPT-2 (MultiHeadAttention, learned
positions from the mask's running count) -- and the torch-exported ``llama_dynamo`` fixture (its
positions are counted over the length, which the C form refuses; on ORT its rotary is inside
GroupQueryAttention, so ``position_ids`` set them; its rows of different pasts run apart).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence

import numpy as np
import pytest

import infercc
from infercc.runtime import paged_runner, tree_attention
from infercc.runtime.engine import Engine
from infercc.runtime.model_runner import ModelRunner
from infercc.runtime.paged_runner import PagedRow, PagedRunner
from infercc.runtime.sampling import SamplingParams
from infercc.runtime.speculative.loop import SpeculativeGeneration
from infercc.runtime.speculative.policy import DepthPolicy
from infercc.runtime.speculative.proposer import Proposal
from infercc.runtime.tree_attention import compact_moves
from infercc.runtime.tree_ort import probe, tree_variant
from tests.fixtures import catalog

from ._hf_models import write_hf
from ._tree_paths import paths, scripted

#: Largest |tree - chain| / (1 + |chain|) of the logits. Measured: 4.6e-6 (GQA), 1.2e-6 (GPT-2);
#: ORT's own spread between one run of a 7-token chain and the same tokens decoded one by one is
#: 1.3e-5 on the GQA model (float32 sums in another order), so this is that noise, not a bias.
TOLERANCE = 3e-5
PROMPTS = [[1, 5, 9, 13, 7, 22, 3, 40], [4, 8, 15, 16, 23], [42, 3, 9, 11, 2, 17, 30]]
#: A row: the last token, then 6 nodes; node 2 (row 3) is a child of node 0, 3 and 4 of node 1, 5 of node 3.
TREE = [-1, 0, 0, 1, 2, 2, 4]
TABLE = [7, 2, 9, 4, 11]


@pytest.fixture(scope="module", params=["gqa", "gpt2", "llama_dynamo"])
def model(request, tmp_path_factory) -> infercc.CompiledModel:
    root = tmp_path_factory.mktemp("tree_ort")
    source = {"gqa": lambda: write_hf(root / "llama", head_size=16), "gpt2": lambda: write_hf(root / "gpt2", "gpt2"),
              "llama_dynamo": lambda: catalog.fixture_path("llama_dynamo")}[request.param]()
    compiled = infercc.compile(str(source), backend="ort", kv_cache_dtype="fp32")
    tree, why = tree_variant(compiled)
    assert tree is not None, why
    assert ("MultiHeadAttention" if request.param == "gpt2" else "GroupQueryAttention") in tree.form
    return compiled



def prefilled(compiled: infercc.CompiledModel) -> PagedRunner:
    runner = PagedRunner(compiled, 16, 4)
    assert runner.form == "ort-gather"
    runner.step([PagedRow("a", PROMPTS[0][:-1], 0, TABLE)])
    return runner


def tree_chain_gap(compiled: infercc.CompiledModel) -> float:
    """Largest |tree row's logits - a chain's along the node's path| / (1 + |chain|) on the gather form."""
    start, tokens = len(PROMPTS[0]) - 1, [PROMPTS[0][-1], 60, 17, 3, 17, 33, 21]
    runner = prefilled(compiled)
    assert runner.tree_reason() is None
    got = runner.step([PagedRow("a", tokens, start, TABLE, num_logits=len(tokens), tree=TREE)])
    gap = 0.0
    for i, path in enumerate(paths(TREE)):
        chain = prefilled(compiled).step([PagedRow("a", [tokens[j] for j in path], start, TABLE)])
        gap = max(gap, float((np.abs(got[i] - chain[0]) / (1 + np.abs(chain[0]))).max()))
    return gap


def test_tree_row_equals_chains_along_its_paths(model):
    assert tree_chain_gap(model) <= TOLERANCE


def test_a_mask_that_shows_a_sibling_breaks_the_equality(model, monkeypatch):
    """The check above can fail: node 2 (row 2) allowed to see its sibling node 1 (row 1)."""
    def broken(trees, pasts, width, positions):
        feeds = tree_attention.tree_feeds(trees, pasts, width, positions)
        feeds[tree_attention.TREE_MASK][:, 0, 2, width + 1] = True
        return feeds

    monkeypatch.setattr(paged_runner, "tree_feeds", broken)
    assert tree_chain_gap(model) > 100 * TOLERANCE


class Broken:
    """The variant's backend with its tree inputs spoiled: ``siblings`` lets every node see every
    earlier one (a chain's mask), else positions are counted by row (a chain's positions)."""

    def __init__(self, inner, siblings: bool) -> None:
        self.inner, self.model, self.siblings = inner, inner.model, siblings

    def run(self, feeds: dict) -> dict:
        feeds = dict(feeds)
        if self.siblings:
            mask = feeds[tree_attention.TREE_MASK].copy()
            s = mask.shape[2]
            mask[:, 0, :, mask.shape[3] - s:] |= np.tril(np.ones((s, s), bool))
            feeds[tree_attention.TREE_MASK] = mask
        else:
            feeds["attention_mask"] = np.ones_like(feeds["attention_mask"])
            if "position_ids" in feeds:
                past = feeds["attention_mask"].shape[1] - feeds["input_ids"].shape[1]
                feeds["position_ids"] = past + np.arange(feeds["input_ids"].shape[1])[None, :]
        return self.inner.run(feeds)


@pytest.mark.parametrize("siblings", [True, False])
def test_the_probe_refuses_a_variant_that_runs_trees_as_chains(model, siblings):
    tree, _ = tree_variant(model)
    assert probe(model, tree) is None
    why = probe(model, dataclasses.replace(tree, backend=Broken(tree.backend, siblings)))
    assert why is not None and "a tree node's attention differs from a chain's" in why


def test_compacted_path_decodes_as_a_chain(model):
    start, tokens = len(PROMPTS[0]) - 1, [PROMPTS[0][-1], 60, 17, 3, 17, 33, 21]
    runner = prefilled(model)
    runner.step([PagedRow("a", tokens, start, TABLE, num_logits=len(tokens), tree=TREE)])
    path = [0, 2, 4]  # rows: the first token, node 1, node 3
    runner.compact(TABLE, compact_moves(start, path))
    after = runner.step([PagedRow("a", [8], start + len(path), TABLE)])
    plain = prefilled(model)
    plain.step([PagedRow("a", [tokens[j] for j in path], start, TABLE)])
    want = plain.step([PagedRow("a", [8], start + len(path), TABLE)])
    assert float((np.abs(after - want) / (1 + np.abs(want))).max()) <= TOLERANCE


# -- greedy decoding with hand-built trees ------------------------------------------------------------
class TreeOracle:
    """Trees around each sequence's true greedy continuation: a wrong token first, the right one
    second (its subtree right for two more depths, with a wrong sibling); every third call all
    wrong. Keyed by the sequence's prompt (the engine's and the loop's sequence ids differ)."""

    name = "tree-oracle"
    tree_width = 3

    def __init__(self, truths: dict[tuple[int, ...], list[int]], vocab: int) -> None:
        self.truths, self.vocab, self.calls, self.trees = truths, vocab, 0, 0

    def propose(self, seq_id: Hashable, tokens: Sequence[int], k: int, params: SamplingParams) -> Proposal:
        prompt = next(p for p in self.truths if tuple(tokens[:len(p)]) == p)
        done = len(tokens) - len(prompt)
        t = self.truths[prompt][done:done + 3]
        if len(t) < 3 or k < 6:
            return Proposal([])
        self.calls += 1
        proposal = scripted(t, self.vocab, self.calls)
        self.trees += proposal.is_tree
        return proposal

    def observe(self, seq_id, length, states) -> None:
        pass

    def release(self, seq_id: Hashable) -> None:
        pass


def truths(compiled: infercc.CompiledModel, prompts: list[list[int]], max_new: int) -> dict:
    return {tuple(p): compiled.generate(p, max_new_tokens=max_new, ignore_eos=True, speculation="off").token_ids
            for p in prompts}


def test_engine_batch_with_trees_is_plain_greedy(model):
    want = truths(model, PROMPTS, 16)
    config = model.config.replace(kv_cache_layout="paged", speculation="prompt_lookup", speculation_policy="latency",
                                  num_speculative_tokens=6)
    eng = Engine(model, config)
    assert eng.runner.form == "ort-gather"
    spec = eng._speculation()
    oracle = TreeOracle(want, eng.vocab_size)
    spec._proposers["prompt_lookup"], spec._policies["prompt_lookup"] = oracle, DepthPolicy(config, fixed=6)
    moves: list = []
    compact = eng.runner.compact
    eng.runner.compact = lambda table, pairs: (moves.append(pairs), compact(table, pairs))
    for i, prompt in enumerate(PROMPTS):
        eng.add_request(f"r{i}", prompt, SamplingParams(max_new_tokens=16, ignore_eos=True))
    done = {}
    while eng.has_unfinished():
        done.update({o.request_id: o.token_ids for o in eng.step() if o.finished})
    assert [done[f"r{i}"] for i in range(len(PROMPTS))] == [want[tuple(p)] for p in PROMPTS]
    assert oracle.trees >= 3 and moves and spec.totals.accepted >= 2 * len(moves)


def test_single_prompt_loop_with_trees_is_plain_greedy(model):
    from infercc.runtime.generate import _tokenizer_or_none

    want = truths(model, PROMPTS[:1], 20)
    tree, _ = tree_variant(model)
    runner = ModelRunner(model.backend, model.model)
    oracle = TreeOracle(want, runner.vocab_size)
    moved: list = []
    generation = SpeculativeGeneration(runner, _tokenizer_or_none(model), [PROMPTS[0]],
                                       SamplingParams(max_new_tokens=20, ignore_eos=True), oracle,
                                       DepthPolicy(model.config, fixed=6), tree)
    step_tree = runner.step_tree
    runner.step_tree = lambda *a, **k: (moved.append(1), step_tree(*a, **k))[1]
    result = generation.run()[0]
    assert result.token_ids == want[tuple(PROMPTS[0])]
    assert oracle.trees >= 2 and len(moved) >= oracle.trees and result.speculation.accepted >= 2 * oracle.trees


def test_loop_sets_the_proposer_width_and_says_why_not(tmp_path):
    from infercc.runtime.speculative.loop import _trees

    class Heads:
        tree_width = 1

    windowed = infercc.compile(write_hf(tmp_path / "m", "mistral", sliding_window=4), backend="ort",
                               kv_cache_dtype="fp32", speculation_tree_width=3)
    runner = ModelRunner(windowed.backend, windowed.model)
    heads = Heads()
    tree, note = _trees(windowed, runner, heads)
    assert tree is None and heads.tree_width == 1 and "sliding window" in note
    assert "chains only" in windowed.diagnostics.facts["speculation_trees"]
    assert "sliding window" in PagedRunner(windowed, 8, 4).tree_reason()
