"""Tree attention (runtime/tree_attention.py) on the C paged runner and in the engine.

* the tree mask and positions: PagedAttention's NumPy reference with ``tree_feeds``'s mask gives
  each node what a chain of its own path gives; the C runner's logits for a tree row are, bit for
  bit, those of chain rows along each of its paths (tests/codegen/test_paged_attention.py checks
  the kernel's tree rows alone);
* compaction: after a tree step and ``compact`` the cache is the plain path's (the next decode's
  logits agree);
* the engine: greedy decoding with a proposer that returns hand-built trees (the right branch not
  first, wrong branches, trees that are all wrong) is token for token plain greedy decoding, on a
  random-weight GGUF and on stories260K;
* refusals: a graph whose positions read the mask's values otherwise, a float bias mask, the
  ORT-gather form; malformed trees.

Models: the tiny random LLaMA GGUF (two C builds: the paged graph and its tree variant).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import pytest

import infercc
from infercc.errors import InputError
from infercc.ir import DType
from infercc.passes.fusion.attention_op import AttentionSpec
from infercc.passes.kv_cache.paged_op import PagedSpec, reference
from infercc.runtime.engine import Engine
from infercc.runtime.paged_runner import PagedRow, PagedRunner
from infercc.runtime.sampling import SamplingParams
from infercc.runtime.speculative.policy import DepthPolicy
from infercc.runtime.speculative.proposer import Proposal
from infercc.runtime.tree_attention import compact_moves, graph_problem, tree_feeds
from tests.importers._models import STORIES, require

from ._tree_paths import paths, scripted

PROMPT = [1, 5, 9, 13, 7, 22, 3, 40]
#: A row: the last token, then 6 nodes; node 2 (row 3) is a child of node 0, 3 and 4 of node 1, 5 of node 3.
TREE = [-1, 0, 0, 1, 2, 2, 4]



# -- the mask and positions -----------------------------------------------------------------------
def test_tree_mask_in_the_reference_gives_each_node_its_paths_attention():
    rng = np.random.default_rng(0)
    spec = PagedSpec(AttentionSpec(num_heads=4, kv_num_heads=2, head_size=8, v_head_size=8, scale=0.35, causal=True,
                                   left_window=-1, mask_value=-3.0e38), 4)
    past, s = 5, len(TREE)
    q, k, v = (rng.standard_normal((1, s, n)).astype(np.float32) for n in (32, 16, 16))
    key_pool, value_pool = (rng.standard_normal((6, 2, 4, 8)).astype(np.float32) for _ in range(2))
    tables, lens = np.asarray([[3, 1, 4, 0]], np.int32), np.asarray([past], np.int32)
    feeds = tree_feeds([TREE], np.asarray([past]), past + 2, positions=True)  # 2 columns of left padding
    assert feeds["position_ids"].tolist() == [[past + d for d in (0, 1, 1, 2, 2, 2, 3)]]
    assert np.cumsum(feeds["attention_mask"][0])[-s:].tolist() == [past + 1 + d for d in (0, 1, 1, 2, 2, 2, 3)]
    tree_out = reference(q, k, v, feeds["kv_tree_mask"], key_pool.copy(), value_pool.copy(), tables, lens, spec)
    for i, path in enumerate(paths(TREE)):
        chain = reference(q[:, path], k[:, path], v[:, path], None, key_pool.copy(), value_pool.copy(), tables,
                          lens, spec)
        np.testing.assert_allclose(tree_out[0, i], chain[0, -1], rtol=1e-5, atol=1e-6)


def test_compact_moves_bring_the_path_together():
    assert compact_moves(10, [0, 1, 2]) == []
    assert compact_moves(10, [0, 2, 5, 6]) == [(12, 11), (15, 12), (16, 13)]


# -- the C paged runner ---------------------------------------------------------------------------
def prefilled(compiled: infercc.CompiledModel) -> PagedRunner:
    runner = PagedRunner(compiled, 16, 4)
    runner.step([PagedRow("a", PROMPT[:-1], 0, [7, 2, 9, 4, 11])])
    return runner


def test_tree_row_equals_a_chain_along_each_path_and_compacts(tiny_c):
    table, start = [7, 2, 9, 4, 11], len(PROMPT) - 1
    tokens = [PROMPT[-1], 99, 17, 3, 17, 60, 21]
    runner = prefilled(tiny_c)
    assert runner.tree_reason() is None
    tree_logits = runner.step([PagedRow("a", tokens, start, table, num_logits=len(tokens), tree=TREE)])
    for i, path in enumerate(paths(TREE)):
        chain = prefilled(tiny_c).step([PagedRow("a", [tokens[j] for j in path], start, table, num_logits=1)])
        assert np.array_equal(tree_logits[i], chain[0]), i  # bit for bit (paged_attention.h's tree rows)
    # keep the path 0 -> 2 -> 4 (rows), move its K/V together, decode on: as if the path had been a chain
    path = [0, 2, 4]
    runner.compact(table, compact_moves(start, path))
    after = runner.step([PagedRow("a", [8], start + len(path), table)])
    plain = prefilled(tiny_c)
    plain.step([PagedRow("a", [tokens[j] for j in path], start, table)])
    assert np.array_equal(after, plain.step([PagedRow("a", [8], start + len(path), table)]))


def test_malformed_trees_are_refused(tiny_c):
    runner = prefilled(tiny_c)
    row = dict(seq_id="a", tokens=[PROMPT[-1], 5, 6], start=len(PROMPT) - 1, block_table=[7, 2, 9, 4, 11])
    for tree, words in (([-1, 0], "3 tokens has 2 parents"), ([-1, 2, 0], "parent 2"),
                        ([-1, -1, 0], "without a parent")):
        with pytest.raises(InputError, match=words):
            runner.step([PagedRow(**row, tree=tree)])
    with pytest.raises(InputError, match="breadth-first"):
        runner.step([PagedRow(**{**row, "tokens": [PROMPT[-1], 5, 6, 7]}, tree=[-1, 0, 1, 0])])


def test_graphs_that_cannot_take_trees_say_why(tiny_c):
    model = tiny_c.model.clone()
    graph = model.graph
    attention = next(n for n in graph.nodes if n.op_type == "Attention")
    float_mask = graph.add_input("bias", DType.FLOAT, ("batch", 1, 1, "total_sequence"))
    attention.set_input(3, float_mask)
    assert "bias such as ALiBi" in graph_problem(model)
    gather = PagedRunner(tiny_c, 16, 4, form="ort-gather")
    assert "C paged form" in gather.tree_reason()
    with pytest.raises(InputError, match="cannot run trees"):
        gather.step([PagedRow("a", [1, 2], 0, [0], tree=[-1, 0])])


def test_positions_from_a_masked_fill_refuse_trees(tiny_c):
    """HF's ``position_ids.masked_fill(mask == 0, 1)``: the mask's values reach the positions
    other than through the running count."""
    from infercc.passes.rewrite import Builder

    model = tiny_c.model.clone()
    graph = model.graph
    mask = next(v for v in graph.inputs if v.name == "attention_mask")
    cumsum = next(n for n in graph.nodes if n.op_type == "CumSum")
    out = cumsum.outputs[0]
    users = list(out.uses)
    op = Builder(graph, cumsum, "fill")
    filled = op.Add(out, op.Cast(mask, to=int(out.dtype or DType.INT64)))
    for node, index in users:
        node.set_input(index, filled)
    assert "other than through a running count" in graph_problem(model)


# -- the engine -----------------------------------------------------------------------------------
class TreeOracle:
    """Proposes hand-built trees around the true greedy continuation: step n's tree puts a wrong
    token first, the right one second (its subtree goes on right for two more depths, with a wrong
    sibling), and every third step the whole tree is wrong."""

    name = "tree-oracle"

    def __init__(self, prompt: list[int], truth: list[int], vocab: int) -> None:
        self.prompt, self.truth, self.vocab, self.calls = prompt, truth, vocab, 0

    def propose(self, seq_id: Hashable, tokens: Sequence[int], k: int, params: SamplingParams) -> Proposal:
        done = len(tokens) - len(self.prompt)
        t = self.truth[done:done + 3]
        if len(t) < 3 or k < 6:
            return Proposal([])
        self.calls += 1
        return scripted(t, self.vocab, self.calls)

    def release(self, seq_id: Hashable) -> None:
        pass


def tree_generate(compiled: infercc.CompiledModel, prompt: list[int], max_new: int) -> tuple[list[int], TreeOracle]:
    truth = compiled.generate(prompt, max_new_tokens=max_new, ignore_eos=True).token_ids
    config = compiled.config.replace(kv_cache_layout="paged", speculation="prompt_lookup",
                                     speculation_policy="latency", num_speculative_tokens=6)
    eng = Engine(compiled, config)
    spec = eng._speculation()
    oracle = TreeOracle(prompt, truth, eng.vocab_size)
    spec._proposers["prompt_lookup"], spec._policies["prompt_lookup"] = oracle, DepthPolicy(config, fixed=6)
    moves: list = []
    compact = eng.runner.compact
    eng.runner.compact = lambda table, pairs: (moves.append(pairs), compact(table, pairs))
    eng.add_request("r", prompt, SamplingParams(max_new_tokens=max_new, ignore_eos=True))
    out = []
    while eng.has_unfinished():
        out += [o.token_ids for o in eng.step() if o.finished]
    assert out[0] == truth
    # right branches (second at their level) stood and were moved together; all-wrong trees emitted one token
    assert spec.totals.accepted >= 2 * len(moves) > 0 and spec.totals.steps > len(moves)
    return out[0], oracle


def test_engine_tree_speculation_is_plain_greedy(tiny_c):
    _, oracle = tree_generate(tiny_c, PROMPT, 30)
    assert oracle.calls >= 3


@pytest.mark.slow  # (a C build of stories260K's tree graph)
def test_engine_tree_speculation_on_stories260k():
    compiled = infercc.compile(require(STORIES), backend="c")
    if compiled.runtime != "c":
        pytest.skip(f"the generated-C runtime is not available here: {compiled.runtime_reason}")
    prompt = compiled.tokenizer.encode("Once upon a time")
    _, oracle = tree_generate(compiled, prompt, 40)
    assert oracle.calls >= 3


def test_positions_counted_over_the_length_refuse_trees():
    """A torch export counts positions with a Range over the mask's length: tree nodes would get
    consecutive positions, so trees are refused (chains keep running)."""
    from tests.fixtures import catalog

    compiled = infercc.compile(str(catalog.fixture_path("llama_dynamo")), kv_cache_dtype="fp32")
    problem = graph_problem(compiled.model)
    assert problem is not None and ("counts positions" in problem or "could not be analysed" in problem), problem
