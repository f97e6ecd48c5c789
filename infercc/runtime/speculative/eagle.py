"""The EAGLE proposer: one draft decoder layer on the target's features guesses the next tokens
autoregressively (eagle_draft.py: the layer, its file and its forward pass).

Why it beats Medusa's heads: a head guesses token t+i from one hidden state, blind to the tokens
guessed before it; the draft layer guesses a feature at a time, so each step knows the tokens
chosen before it and regresses the *feature*, which is far more regular than the token (EAGLE's
finding), and its acceptance falls slowly with depth.

What it is handed: compiled with ``speculation="eagle"`` (or "medusa": the same output), the
target's graph exposes its final hidden state (passes/hidden_output.py), and whoever runs the
target hands the proposer the states of *every* token a step emitted (``observe(seq_id, length,
rows)``: rows [n, hidden] chose tokens ``length - n .. length - 1``): the draft's KV cache holds
one entry per position of the sequence, made from the true feature there. The prompt's states
but the last are not computed (the target keeps one row of logits for a prompt), so the draft's
cache starts at the prompt's last position, and ``infercc train-heads --kind eagle`` trains it
that way. A sequence seen afresh (or after a gap: a preempted request recomputed) starts again
from the first state it is handed.

Proposing for a sequence of length L: the cache is brought up to position L - 2 from the pending
features and the sequence's own tokens (a proposer is never told which guesses were rejected: the
tokens it is handed decide; a cached entry whose token no longer matches resets the sequence);
the last output is f'_{L-1}, the LM head restricted to the ``draft_vocab`` (as the Medusa heads)
gives the guess of token L; then each further guess feeds (f', guess) back as the next position.
The draft entries of guessed positions are dropped afterwards (cut back to the true ones).
A greedy chain of top-1 guesses, cut at the first one less sure than ``min_confidence``; with
``tree_width`` w > 1 (``Config.speculation_tree_width``, greedy requests) a tree (tree.py): at each
depth along the top-1 path the draft's top w tokens are candidates (runners-up only when at least
``tree.MIN_SIBLING`` probable), the path going on while its top-1 is sure enough (the first doubtful
depth's candidates are still leaves, where a chain stops before it: measured on SmolLM2, that is
where the tree earns its tokens), and the ``k`` most probable candidates are proposed. Only the
top-1 path is run through the draft (one forward per depth, as the chain): the runners-up are
leaves, EAGLE-2's expansion of every kept node would cost a draft forward per node with a tree
mask of its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .eagle_c import C_DRAFT_BYTES
from .eagle_draft import DraftCache, EagleDraft, draft_path, load_draft
from .heads import HeadsError
from .medusa import MIN_CONFIDENCE, _draft_vocab, _weight_count, lm_head_shape, lm_head_weights, load_once
from .products import one_blas_thread
from .proposer import Proposal
from .tree import Candidate, best_tree, expand, top_tokens

if TYPE_CHECKING:
    from ...compiled import CompiledModel
    from ...config import Config
    from ...ir import Model, Node
    from ..sampling import SamplingParams


class Embedding:
    """Rows of the target's token embedding table as float32: the draft vocabulary's rows read once,
    any other token's dequantized when first met (a quantized table is never expanded whole)."""

    def __init__(self, model: Model, vocab_ids: np.ndarray | None) -> None:
        self.node = embedding_node(model)
        self.hidden = lm_head_shape(model)[1]
        self.vocab_ids = vocab_ids
        self.table = self._read(vocab_ids)
        self._rows = {int(t): i for i, t in enumerate(vocab_ids)} if vocab_ids is not None else None
        self._other: dict[int, np.ndarray] = {}

    def _read(self, rows: np.ndarray | None) -> np.ndarray:
        node = self.node
        if node.op_type == "Gather":
            table = _const(node.inputs[0]).numpy()
            return np.ascontiguousarray(table if rows is None else table[rows], np.float32)
        if node.op_type == "GatherBlockQuantized":  # (its rows may be padded to whole blocks)
            return np.ascontiguousarray(_block_quantized_rows(node, rows)[:, :self.hidden])
        from ...passes.quantize.ops import dequantized_weight

        return dequantized_weight(node, rows)

    def local(self, ids: np.ndarray) -> np.ndarray:
        """Rows of draft-vocabulary indices (the draft's own guesses)."""
        return self.table[ids]

    def __call__(self, tokens: Sequence[int]) -> np.ndarray:
        """Rows of token ids [n, hidden]."""
        if self._rows is None:
            return self.table[np.asarray(tokens, np.int64)]
        out = []
        for t in tokens:
            i = self._rows.get(int(t))
            if i is not None:
                out.append(self.table[i])
                continue
            if int(t) not in self._other:
                self._other[int(t)] = self._read(np.asarray([int(t)]))[0]
            out.append(self._other[int(t)])
        return np.stack(out)


def _const(value):
    """The constant behind ``value`` and any reshapes of it (None if there is none)."""
    while value.const is None and value.producer is not None and value.producer.op_type == "Reshape":
        value = value.producer.inputs[0]
    return value.const


def _block_quantized_rows(node: Node, rows: np.ndarray | None) -> np.ndarray:
    """Rows of the table of ORT's GatherBlockQuantized (how our GatherQuant runs on ORT: packed rows
    [N, blocks * block * bits / 8], scales [N, blocks], optional packed zero points), as float32."""
    from ...passes.quantize.pack import unpack_codes, unpack_zero_points

    bits = int(node.attr("bits"))
    scales = node.inputs[2].const.numpy()
    n = scales.shape[0]
    scales = scales.reshape(n, -1).astype(np.float32)
    pick = slice(None) if rows is None else rows
    codes = unpack_codes(_const(node.inputs[0]).numpy().reshape(n, scales.shape[1], -1)[pick], bits).astype(np.float32)
    points = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3] is not None else None
    zeros = np.float32(1 << (bits - 1)) if points is None else \
        unpack_zero_points(points.const.numpy().reshape(n, -1)[pick], bits, scales.shape[1]).astype(np.float32)[..., None]
    return np.ascontiguousarray(((codes - zeros) * scales[pick][..., None]).reshape(len(codes), -1))


def embedding_node(model: Model) -> Node:
    """The Gather / GatherQuant / GatherBlockQuantized looking ``input_ids`` up in a constant table
    (HeadsError if none)."""
    ids = next((v for v in model.graph.inputs if v.name == "input_ids"), None)
    frontier, seen = ([ids] if ids is not None else []), set()
    while frontier:  # through casts and reshapes of the ids
        value = frontier.pop()
        for node in value.consumers():
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in ("Gather", "GatherQuant", "GatherBlockQuantized") and len(node.inputs) > 1 \
                    and node.inputs[1] is value and _const(node.inputs[0]) is not None:
                return node
            if node.op_type in ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"):
                frontier.append(node.outputs[0])
    raise HeadsError("eagle: no embedding table found (a Gather of input_ids from a constant table)")


@dataclasses.dataclass
class _State:
    """One sequence: the draft cache (true features only), the token of each cached entry, and the
    features handed over but not yet in the cache."""

    cache: DraftCache
    tokens: list[int] = dataclasses.field(default_factory=list)
    pending: list[np.ndarray] = dataclasses.field(default_factory=list)
    #: The draft's output at the last cached position (f'_{L-1}: the first guess's feature).
    last: np.ndarray | None = None
    #: The draft-vocabulary logits of ``last`` (the first guess is their top token).
    logits: np.ndarray | None = None

    @property
    def end(self) -> int:
        """One past the last position with a known feature."""
        return self.cache.base + self.cache.length + len(self.pending)


class EagleProposer:
    """Guesses with the draft layer over each sequence's features (see the module docstring)."""

    name = "eagle"
    #: The caller hands it hidden states (``observe``) after each target step.
    needs_hidden = True

    def __init__(self, draft: EagleDraft, lm_head: np.ndarray, embedding: Embedding, cost: float = 0.0,
                 min_confidence: float = MIN_CONFIDENCE, tree_width: int = 1) -> None:
        self.draft = draft
        #: [len(draft_vocab) or vocab, hidden]: the LM head's rows of the draft vocabulary.
        self.lm_head = lm_head
        self.embedding = embedding
        self.vocab_ids = embedding.vocab_ids
        #: Cost of proposing one token relative to one target step (DepthPolicy's draft_cost).
        self.cost = cost
        self.min_confidence = min_confidence
        #: Candidates per depth (1: chains; the engine sets ``Config.speculation_tree_width`` where
        #: its runner verifies trees: other verifiers take chains only).
        self.tree_width = tree_width
        self._states: dict[Hashable, _State] = {}

    def observe(self, seq_id: Hashable, length: int, hidden: np.ndarray) -> None:
        """``hidden`` [n, hidden] ([hidden]: n = 1) are the states whose logits chose tokens
        ``length - n .. length - 1``, i.e. the features at positions ``length - 1 - n ..  length - 2``."""
        rows = np.asarray(hidden, np.float32).reshape(-1, self.draft.hidden)
        start = length - 1 - len(rows)
        state = self._states.get(seq_id)
        if state is None or start > state.end or start < state.cache.base:  # fresh, or a gap: start over
            self._states[seq_id] = _State(self.draft.new_cache(start), pending=list(rows))
            return
        cached = state.cache.base + state.cache.length
        if start < cached:  # positions seen again: their entries are recomputed from these
            self._cut(state, start - state.cache.base)
        state.pending = state.pending[:max(start - cached, 0)] + list(rows)

    def propose(self, seq_id: Hashable, tokens: Sequence[int], k: int, params: SamplingParams) -> Proposal:
        with one_blas_thread():
            return self._propose(seq_id, tokens, k, params)

    def _propose(self, seq_id: Hashable, tokens: Sequence[int], k: int, params: SamplingParams) -> Proposal:
        state = self._states.get(seq_id)
        length = len(tokens)
        if state is None or k <= 0 or state.end != length - 1:
            return Proposal([])
        cache = state.cache
        known = np.asarray(tokens[cache.base + 1:cache.base + 1 + cache.length], np.int64)
        if not np.array_equal(known, state.tokens):  # the sequence changed under the cache: start over
            self._states.pop(seq_id)
            return Proposal([])
        if state.pending:
            new = list(tokens[cache.base + cache.length + 1:length])
            feature, state.logits = self.draft.step(cache, np.stack(state.pending), self.embedding(new), self.lm_head)
            state.last = feature[-1:]
            state.tokens += [int(t) for t in new]
            state.pending = []
        if state.last is None:
            return Proposal([])
        if self.tree_width > 1 and params.greedy:
            return self._tree(state, state.last, state.logits, k)
        return self._chain(state, state.last, state.logits, k)

    def _tree(self, state: _State, feature: np.ndarray, logits: np.ndarray, k: int) -> Proposal:
        """The ``k`` most probable of the top-w candidates along the top-1 path (module docstring)."""
        true_length = state.cache.length
        candidates: list[Candidate] = []
        parent = -1
        try:
            for step in range(k):
                top, probs = top_tokens(logits, self.tree_width)
                parent = expand(candidates, [parent], top, probs)[0]
                if probs[0] < self.min_confidence or step + 1 == k:
                    break
                embed = self.embedding.local(top[:1]) if self.vocab_ids is not None else self.embedding([int(top[0])])
                feature, logits = self.draft.step(state.cache, feature, embed, self.lm_head)
        finally:
            state.cache.length = true_length
        if self.vocab_ids is not None:
            candidates = [dataclasses.replace(c, token=int(self.vocab_ids[c.token])) for c in candidates]
        return best_tree(candidates, k)

    def _chain(self, state: _State, feature: np.ndarray, logits: np.ndarray, k: int) -> Proposal:
        """Up to k guesses from f'_{L-1} (``logits``: its own), each fed back; the guessed
        positions' entries dropped."""
        true_length = state.cache.length
        guesses: list[int] = []
        try:
            for step in range(k):
                best = int(np.argmax(logits))
                if 1.0 / np.exp(logits - logits[best]).sum() < self.min_confidence:
                    break  # a guess the draft doubts costs a verified position, rarely a token
                guesses.append(best)
                if step + 1 < k:
                    embed = self.embedding.local(np.asarray([best])) if self.vocab_ids is not None \
                        else self.embedding([best])
                    feature, logits = self.draft.step(state.cache, feature, embed, self.lm_head)
        finally:
            state.cache.length = true_length
        if self.vocab_ids is not None:
            guesses = [int(self.vocab_ids[g]) for g in guesses]
        return Proposal(guesses)

    def _cut(self, state: _State, length: int) -> None:
        state.cache.length = max(length, 0)
        del state.tokens[state.cache.length:]
        state.last = state.logits = None

    def release(self, seq_id: Hashable) -> None:
        self._states.pop(seq_id, None)


def make_eagle(compiled: CompiledModel, config: Config) -> tuple[EagleProposer | None, str]:
    """The EAGLE proposer of ``compiled`` with the draft in ``config.speculation_heads``, or (None, why not)."""
    parts, why = load_once(compiled, config, "eagle", "EAGLE draft", draft_path, _load,
                           "train one with `infercc train-heads MODEL -o DIR --kind eagle`")
    if parts is None:
        return None, why
    draft, lm_head, embedding, cost, confidence = parts
    return EagleProposer(draft, lm_head, embedding, cost, confidence), \
        f"eagle: a draft layer of {draft.macs / 1e6:.1f}M weights from {why}; {draft.runs_on}"


def _load(compiled: CompiledModel, file: Path) -> tuple:
    vocab, hidden = lm_head_shape(compiled.model)
    draft, config = load_draft(file, hidden)
    vocab_ids = _draft_vocab(file, vocab)
    confidence = config.get("min_confidence", MIN_CONFIDENCE)
    if not isinstance(confidence, (int, float)) or isinstance(confidence, bool) or not 0 <= confidence <= 1:
        raise HeadsError(f"{file.parent}/config.json: min_confidence must be a number in [0, 1], got {confidence!r}")
    rows = len(vocab_ids) if vocab_ids is not None else vocab
    cost = (draft.macs + rows * hidden) / max(_weight_count(compiled.model), 1)
    lm_head = lm_head_weights(compiled.model, vocab_ids)
    if compiled.runtime == "c" and draft.macs * 4 >= C_DRAFT_BYTES:  # (see eagle_c.py)
        from .eagle_c import c_draft

        # a restricted head goes into the library; the whole vocabulary's stays a NumPy product
        built, where = c_draft(draft, compiled.config.intra_op_threads, lm_head if vocab_ids is not None else None)
        draft = built or draft
        draft.runs_on = where
    return draft, lm_head, Embedding(compiled.model, vocab_ids), cost, float(confidence)
