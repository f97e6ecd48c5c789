"""The Medusa proposer: k heads on the target's final hidden state guess the k tokens after the
next one, at the cost of a few small matrix products, with no draft model and no draft KV cache.

Where the hidden state comes from: compiled with ``speculation="medusa"``, the target's graph
has a ``hidden_states`` output (passes/hidden_output.py: the LM head's input), and whoever runs
the target (the speculative loop, the engine) hands the proposer, after each step, the hidden
state of the position whose logits chose the sequence's last token (``observe``). Head i of
Medusa was trained to predict the token i + 2 positions after that hidden state's own token, i.e.
i + 1 after the one just chosen: the proposal continues the sequence as it stands. A proposer
asked about a sequence whose last observed state is not for its current length (a fresh
sequence, a preempted one) proposes nothing: that step decodes plainly and brings a state.

Proposal = the chain of each head's top-1 token, cut at the first head less sure than
``min_confidence`` (a doubtful guess widens the verify step for little chance of a token). With
``tree_width`` w > 1 (``Config.speculation_tree_width``; greedy requests where the engine's runner
verifies trees) Medusa's sparse tree instead: every kept node at depth i gets head i's top w
tokens as children (the heads do not see the tokens before theirs, so the children are the same
under every parent: the Cartesian product), runners-up from ``tree.MIN_SIBLING`` on, down to the
first head whose top token is doubtful (its candidates are leaves), and the ``k`` nodes most
probable by the product of their heads' probabilities are proposed (tree.py).
Heads trained by ``infercc train-heads`` share the target's LM head, read here from the compiled
graph (float, or dequantized from its 4/8-bit blocks); their ``config.json`` may restrict it to
the ``draft_vocab`` ids most frequent in the training text (a head's guess outside it would
rarely be right, and a tenth of the vocabulary is a tenth of the projection's cost).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .heads import HeadsError, MedusaHeads, heads_path, load_heads, read_config
from .products import linear, one_blas_thread
from .proposer import Proposal
from .tree import Candidate, best_tree, expand, top_tokens

if TYPE_CHECKING:
    from ...compiled import CompiledModel
    from ...config import Config
    from ...ir import Model
    from ..sampling import SamplingParams


_LOCK = threading.Lock()
#: Default least probability of a head's guess to be proposed (heads' config.json "min_confidence"
#: overrides it; train-heads writes the one that pays best on held-out text).
MIN_CONFIDENCE = 0.3


class MedusaProposer:
    """Guesses from the last observed hidden state of each sequence (see the module docstring)."""

    name = "medusa"
    #: The caller hands it hidden states (``observe``) after each target step.
    needs_hidden = True

    def __init__(self, heads: MedusaHeads, lm_head: np.ndarray | None, vocab_ids: np.ndarray | None = None,
                 cost: float = 0.0, min_confidence: float = MIN_CONFIDENCE) -> None:
        self.heads = heads
        #: The chain of guesses stops at the first head whose top token has a lower probability.
        self.min_confidence = min_confidence
        self.vocab_ids = vocab_ids
        #: [len(vocab_ids) or vocab, hidden]: the LM head's rows of the draft vocabulary.
        self.lm_head = lm_head
        #: Cost of proposing relative to one target step (DepthPolicy's draft_cost).
        self.cost = cost
        #: Candidates per head (1: chains; the engine sets ``Config.speculation_tree_width`` where
        #: its runner verifies trees: other verifiers take chains only).
        self.tree_width = 1
        self._hidden: dict[Hashable, tuple[int, np.ndarray]] = {}

    def observe(self, seq_id: Hashable, length: int, hidden: np.ndarray) -> None:
        """``hidden`` [hidden] is the state whose logits chose token ``length - 1`` of the sequence
        ([n, hidden]: those of tokens ``length - n .. length - 1``; the heads read the last)."""
        hidden = np.asarray(hidden)
        self._hidden[seq_id] = (length, np.array(hidden[-1] if hidden.ndim == 2 else hidden, np.float32).reshape(-1))

    def propose(self, seq_id: Hashable, tokens: Sequence[int], k: int, params: SamplingParams) -> Proposal:
        entry = self._hidden.get(seq_id)
        k = min(k, self.heads.num_heads)
        if entry is None or entry[0] != len(tokens) or k <= 0:
            return Proposal([])
        with one_blas_thread():
            if self.tree_width > 1 and params.greedy:
                return self._tree(entry[1], k)
            guesses, probs = self.heads.top1(entry[1], self.lm_head, k)
        confident = next((i for i, p in enumerate(probs) if p < self.min_confidence), len(probs))
        guesses = guesses[:confident]  # a guess its head doubts costs a verified position, rarely a token
        if self.vocab_ids is not None:  # heads projected by the restricted LM head: back to token ids
            guesses = [int(self.vocab_ids[g]) if self.heads.projections[i] is None else g
                       for i, g in enumerate(guesses)]
        return Proposal(guesses)

    def _tree(self, hidden: np.ndarray, k: int) -> Proposal:
        """The sparse tree of the heads' top candidates (module docstring)."""
        candidates: list[Candidate] = []
        level = [-1]
        for i, feature in enumerate(self.heads.features(hidden)[:k]):
            projection = self.heads.projections[i]
            top, probs = top_tokens(linear(feature, self.lm_head if projection is None else projection),
                                    self.tree_width)
            if self.vocab_ids is not None and projection is None:  # the restricted LM head's rows: token ids
                top = self.vocab_ids[top]
            level = expand(candidates, level, top, probs)
            # a node outside its depth's best k has k better nodes there (and their ancestors): never kept
            level = sorted(level, key=lambda c: -candidates[c].score)[:k]
            if probs[0] < self.min_confidence:
                break
        return best_tree(candidates, k)

    def release(self, seq_id: Hashable) -> None:
        self._hidden.pop(seq_id, None)


def make_medusa(compiled: CompiledModel, config: Config) -> tuple[MedusaProposer | None, str]:
    """The Medusa proposer of ``compiled`` with ``config.speculation_heads``, or (None, why not)."""
    parts, why = load_once(compiled, config, "medusa", "Medusa heads", heads_path, _load,
                           "train them with `infercc train-heads MODEL -o DIR`")
    if parts is None:
        return None, why
    return MedusaProposer(*parts[:3], cost=parts[3], min_confidence=parts[4]), \
        f"medusa: {parts[0].num_heads} heads from {why}"


def load_once(compiled: CompiledModel, config: Config, method: str, what: str, file_of: Callable[[str], Path],
              load: Callable[[CompiledModel, Path], Any], train: str) -> tuple[Any, str]:
    """(``load(compiled, file)``, the file) for the file ``config.speculation_heads`` names, or
    (None, why a hidden-state proposer cannot run): no path, no ``hidden_states`` output, no file.
    A file that is there but wrong is an error (``load`` raises HeadsError). Read once per compiled
    model and file (every engine, e.g. each generate() on the C runtime, makes its proposer); each
    caller then makes a new proposer, whose per-sequence states are its own."""
    from ...passes.hidden_output import HIDDEN

    if config.speculation_heads is None:
        return None, f"{method}: no heads (Config.speculation_heads is None); {train} and pass speculation_heads=DIR"
    outputs = {v.name: v for v in compiled.model.graph.outputs}
    if HIDDEN not in outputs:
        try:
            why = "; ".join(compiled.diagnostics["expose_hidden_state"].reasons)
        except KeyError:
            why = ""
        why = why or f"compile the model with speculation={method!r} so that its graph exposes the final hidden state"
        return None, f"{method}: the compiled graph has no {HIDDEN!r} output ({why})"
    file = file_of(config.speculation_heads)
    if not file.is_file():  # missing heads: plain decoding; a file that is there but wrong: an error
        return None, f"{method}: no {what} at {file}; {train}"
    key = (method, str(file.resolve()), file.stat().st_mtime_ns)
    with _LOCK:
        memo = compiled.__dict__.setdefault("_speculation_heads", {})
        if key not in memo:
            memo[key] = load(compiled, file)
        return memo[key], str(file)


def _load(compiled: CompiledModel, file) -> tuple:
    """(heads, projection shared by the heads without their own or None, draft vocabulary ids or
    None, cost relative to a target step, min_confidence) of the heads in ``file``."""
    vocab, hidden = lm_head_shape(compiled.model)
    heads = load_heads(file, hidden, vocab)
    vocab_ids = _draft_vocab(file, vocab)
    confidence = read_config(file).get("min_confidence", MIN_CONFIDENCE)
    if not isinstance(confidence, (int, float)) or isinstance(confidence, bool) or not 0 <= confidence <= 1:
        raise HeadsError(f"{file.parent}/config.json: min_confidence must be a number in [0, 1], got {confidence!r}")
    shared = sum(p is None for p in heads.projections)
    rows = len(vocab_ids) if vocab_ids is not None else vocab
    cost = (heads.num_heads * hidden * hidden + shared * rows * hidden) / max(_weight_count(compiled.model), 1)
    projection = lm_head_weights(compiled.model, vocab_ids) if shared else None
    return heads, projection, vocab_ids, cost, float(confidence)


def _draft_vocab(file, vocab: int) -> np.ndarray | None:
    ids = read_config(file).get("draft_vocab")
    if ids is None:
        return None
    array = np.asarray(ids)
    if array.ndim != 1 or array.size == 0 or array.dtype.kind not in "iu" or array.min() < 0 or array.max() >= vocab:
        raise HeadsError(f"{file.parent}/config.json: draft_vocab must be a list of token ids in 0..{vocab - 1}")
    return array.astype(np.int64)


def _weight_count(model: Model) -> int:
    return sum(int(np.prod(v.shape or ())) for v in model.graph.initializers.values() if v.shape)


def lm_head_weights(model: Model, rows: np.ndarray | None = None) -> np.ndarray:
    """The target's LM head as float32 [vocab, hidden] (only ``rows`` of it when given), read from
    the node consuming the hidden state: a MatMul/Gemm with a constant weight, or MatMulNBits / our
    MatMulQuant (dequantized from their blocks: the same inputs)."""
    node = _lm_head(model)
    if node.op_type in ("MatMul", "Gemm"):
        weight = node.inputs[1].const.numpy()
        transposed = node.op_type == "Gemm" and "transB" in node.attrs and bool(node.attrs["transB"].value)
        weight = weight if transposed else weight.T
        return np.ascontiguousarray((weight if rows is None else weight[rows]).astype(np.float32))
    from ...passes.quantize.ops import dequantized_weight

    return dequantized_weight(node, rows)


def lm_head_shape(model: Model) -> tuple[int, int]:
    """(vocab, hidden) of the target's LM head, without reading its weights."""
    from ...passes.quantize.ops import Spec

    node = _lm_head(model)
    if node.op_type in ("MatMul", "Gemm"):
        k, n = node.inputs[1].const.numpy().shape
        return (k, n) if node.op_type == "Gemm" and "transB" in node.attrs and node.attrs["transB"].value else (n, k)
    spec = Spec(node)
    return spec.n, spec.k


def _lm_head(model: Model):
    from ...passes.hidden_output import HIDDEN

    exposed = next(v for v in model.graph.outputs if v.name == HIDDEN)
    hidden = exposed.producer.inputs[0]
    heads = [n for n in hidden.consumers() if n.outputs[0] is not exposed]
    if len(heads) != 1:
        raise HeadsError(f"medusa: the hidden state feeds {len(heads)} nodes, not one LM head")
    node = heads[0]
    if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1 and node.inputs[1].const is not None:
        return node
    if node.op_type in ("MatMulNBits", "MatMulQuant") and all(v is None or v.const is not None for v in node.inputs[1:]):
        return node
    raise HeadsError(f"medusa: the LM head is a {node.op_type} the heads cannot read weights from")
