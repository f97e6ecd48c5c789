"""The model runner: one forward step of a batch of sequences through a backend (ONNX Runtime or
generated C: both take feeds and write the outputs into arrays given to them).

It knows the graph's text interface (``input_ids``, optional ``attention_mask`` and
``position_ids``, and the cache tensors of the cached-graph contract) and nothing about
sampling or tokenizers. State lives in a ``KVCache`` that the caller owns; the runner appends
the step's tokens to it and returns logits.

Batching: rows whose new tokens differ in number are left-padded to one [batch, s] step with
mask 0 on the padding, so the last position of every row is a real token and one run serves the
batch. That is exact only when padding shifts no position: the graph takes ``position_ids``, or
derives positions from the mask (a CumSum: the cached-graph contract, our importers). Other
graphs (torch exports count positions with a Range, and GPT-2's learned positions would shift)
or graphs without an ``attention_mask`` run padded rows one by one on their real tokens:
correct, just not batched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ..errors import InputError
from ..ir import Model
from ..passes.hidden_output import HIDDEN
from .kv_cache import CacheSpec, KVCache

#: Id written into padding slots: any valid id works, the mask hides it.
PAD_ID = 0
KNOWN_INPUTS = ("input_ids", "attention_mask", "position_ids")


class ModelRunner:
    """Stateless over a backend: any number of threads may call ``step`` with their own caches."""

    def __init__(self, backend, model: Model, max_context: int | None = None) -> None:
        from ..importers import read_metadata

        self.backend = backend
        self.metadata = read_metadata(model)
        self.cache_spec = CacheSpec.from_model(model)
        grows = getattr(backend, "grows_in_place", frozenset())
        if self.cache_spec and not self.cache_spec.shared and all(e.input in grows for e in self.cache_spec.entries):
            # the generated C appends to a shared buffer's rows in place: no past copied per step
            self.cache_spec = dataclasses.replace(self.cache_spec, shared=True, rows_only=True)
        inputs = {v.name: v for v in model.graph.inputs}
        if "input_ids" not in inputs:
            raise InputError(f"cannot generate with this model: it has no 'input_ids' input (inputs: {list(inputs)})")
        cache_inputs = {e.input for e in self.cache_spec.entries} if self.cache_spec else set()
        unknown = [n for n, v in inputs.items() if n not in KNOWN_INPUTS and n not in cache_inputs and v.const is None]
        if unknown:
            raise InputError(
                f"cannot generate with this model: it needs input(s) {unknown} that text generation does not "
                f"provide (known: {list(KNOWN_INPUTS)} and past_key_values.*); use CompiledModel.run() instead"
            )
        self.has_mask = "attention_mask" in inputs
        self.has_positions = "position_ids" in inputs
        # The cached contract's optional scalar: n > 0 = logits of the last n positions only.
        self.keeps_logits = "logits_to_keep" in inputs
        # Whether left padding leaves every real token's position unchanged (see module docstring).
        self.pads_safely = self.has_mask and (
            self.has_positions or any(n.op_type == "CumSum" for n in model.graph.walk()))
        if self.cache_spec and not self.has_mask:
            raise InputError("a cached graph must take 'attention_mask' [batch, past+seq] (the cached-graph contract)")
        self.max_context = max_context if max_context is not None else self.metadata.get("context_length")
        logits = next((v for v in model.graph.outputs if v.name == "logits"), None)
        if logits is None:
            raise InputError(f"cannot generate with this model: it has no 'logits' output "
                             f"(outputs: {[v.name for v in model.graph.outputs]})")
        shape = logits.shape or ()
        self.vocab_size: int | None = shape[-1] if shape and isinstance(shape[-1], int) else self.metadata.get("vocab_size")
        self.logits_dtype = np.dtype(logits.dtype.numpy) if logits.dtype is not None else np.dtype(np.float32)
        #: Whether the graph exposes its final hidden state (compiled for Medusa heads).
        self.has_hidden = any(v.name == HIDDEN for v in model.graph.outputs)

    @property
    def cached(self) -> bool:
        """Whether the graph keeps K/V between steps (else each step recomputes every token)."""
        return self.cache_spec is not None

    def new_cache(self, batch: int = 1) -> KVCache:
        return KVCache(self.cache_spec, batch, self.max_context)

    def step(self, cache: KVCache, tokens: Sequence[Sequence[int]], all_logits: bool = False,
             hidden: list[np.ndarray] | None = None) -> np.ndarray:
        """Feed ``tokens[row]`` (new ids, possibly none for a row that sits this step out) to each
        row of ``cache``. Returns the logits of each row's last position [batch, vocab], or of every
        new position [batch, s, vocab] when ``all_logits`` (a row's padding positions hold zeros).
        ``hidden``: a list the final hidden states of the same positions are appended to
        ([batch, hidden] or [batch, s, hidden]), when the graph exposes them (``has_hidden``)."""
        if len(tokens) != cache.batch:
            raise InputError(f"{len(tokens)} token lists for a cache of {cache.batch} rows")
        width = max((len(t) for t in tokens), default=0)
        if width == 0:
            raise InputError("nothing to run: every row's token list is empty")
        ids = np.full((cache.batch, width), PAD_ID, np.int64)
        mask = np.zeros((cache.batch, width), np.int64)
        for row, row_tokens in enumerate(tokens):
            if len(row_tokens):
                ids[row, width - len(row_tokens):] = _ids(row_tokens, self.vocab_size)
                mask[row, width - len(row_tokens):] = 1
        past = cache.length
        cache.append(ids, mask)
        if self.cached:
            logits = self._run_cached(cache, ids, past, 0 if all_logits else 1, hidden)
            cache.commit(past + width)
            if hidden and not all_logits:
                hidden[-1] = hidden[-1][:, -1]
        else:
            logits = self._run_uncached(cache, past + width, width)
            cache.advance(past + width)
        return logits if all_logits else logits[:, -1]

    def step_tree(self, cache: KVCache, tokens: Sequence[int], parents: Sequence[int], tree,
                  hidden: list[np.ndarray] | None = None) -> np.ndarray:
        """Feed one row of a tree of candidates to a one-row cache: ``tokens[0]`` follows the
        cache, each other token's parent within the row is ``parents[i]`` (breadth-first, -1 only
        for the first). Runs ``tree`` (``tree_ort.OrtTree``: the graph variant with a tree mask)
        and returns the logits of every token [len(tokens), vocab] (``hidden``: as ``step``'s with
        ``all_logits``); all of them are appended to the cache, at consecutive slots: the caller
        moves the accepted path's K/V together (``KVCache.move``) and truncates the rest."""
        from .tree_attention import row_tree_problem

        if cache.batch != 1 or not self.cached or int(cache.real_lengths()[0]) != cache.length:
            raise InputError("step_tree runs one unpadded row on a cached graph")
        problem = row_tree_problem(parents, len(tokens))
        if problem is not None:
            raise InputError(f"step_tree: the tree {problem}; give the parent of each token (-1 for the first)")
        ids = _ids(tokens, self.vocab_size)[None, :]
        past = cache.length
        cache.append(ids, np.ones_like(ids))
        logits = self._run_cached(cache, ids, past, 0, hidden, tree=(tree, list(parents)))
        cache.commit(past + ids.shape[1])
        return logits[0]

    # -- the two paths ------------------------------------------------------------------------
    def _run_cached(self, cache: KVCache, ids: np.ndarray, past: int, keep: int,
                    hidden: list[np.ndarray] | None = None, tree=None) -> np.ndarray:
        """One run over the new tokens; past K/V go in as views, present K/V are written by ORT
        into the cache's other buffer, logits into an array allocated here (no copies). ``keep``
        (0 = all) positions get logits when the graph takes ``logits_to_keep``. ``tree``:
        (``tree_ort.OrtTree``, the row's parents) to run the tree variant (``step_tree``)."""
        total = past + ids.shape[1]
        mask = np.ascontiguousarray(cache.mask[:, :total])
        feeds = {"input_ids": ids, "attention_mask": mask, **cache.past()}
        backend = self.backend
        if tree is not None:
            from .tree_attention import tree_feeds

            backend = tree[0].backend
            feeds.update(tree_feeds([tree[1]], np.asarray([past]), past, tree[0].positions))
        elif self.has_positions:
            feeds["position_ids"] = _positions(mask)[:, past:].copy()
        width = ids.shape[1]
        if self.keeps_logits:
            feeds["logits_to_keep"] = np.asarray(keep, np.int64)
            width = min(keep, width) if keep else width
        vocab = self.vocab_size
        outputs: dict[str, np.ndarray | None] = {
            "logits": None if vocab is None else np.empty((cache.batch, width, vocab), self.logits_dtype)}
        outputs.update(cache.present(total))
        want_hidden = hidden is not None and self.has_hidden
        if want_hidden:
            outputs[HIDDEN] = None
        result = backend.run_bound(feeds, outputs)
        logits = result["logits"]
        if vocab is None:
            self.vocab_size = int(logits.shape[-1])
        if want_hidden:  # (an exposed 2-D [batch * kept, hidden] is the LM head's flattened input)
            hidden.append(result[HIDDEN].reshape(logits.shape[0], logits.shape[1], -1))
        return logits

    def _run_uncached(self, cache: KVCache, total: int, width: int) -> np.ndarray:
        """Recompute every token: the whole history goes in, the new positions' logits come out."""
        ids, mask = cache.ids[:, :total], cache.mask[:, :total]
        if not self.has_mask or (not self.pads_safely and not mask.all()):
            return self._run_rows(cache, total, width)
        feeds = {"input_ids": np.ascontiguousarray(ids), "attention_mask": np.ascontiguousarray(mask)}
        if self.has_positions:
            feeds["position_ids"] = _positions(feeds["attention_mask"])
        logits = self.backend.run(feeds)["logits"]
        if self.vocab_size is None:
            self.vocab_size = int(logits.shape[-1])
        return logits[:, total - width:]

    def _run_rows(self, cache: KVCache, total: int, width: int) -> np.ndarray:
        """Run each row alone on its real tokens (no padding) and right-align its new logits."""
        out: np.ndarray | None = None
        for row in range(cache.batch):
            new = int(cache.mask[row, total - width:total].sum())
            if new == 0:
                continue
            keep = cache.mask[row, :total].astype(bool)
            real = cache.ids[row, :total][keep][None, :]
            feeds = {"input_ids": real}
            if self.has_mask:
                feeds["attention_mask"] = np.ones_like(real)
            if self.has_positions:
                feeds["position_ids"] = np.arange(real.shape[1], dtype=np.int64)[None, :]
            logits = self.backend.run(feeds)["logits"][0, -new:]
            if out is None:
                out = np.zeros((cache.batch, width, logits.shape[-1]), logits.dtype)
                self.vocab_size = int(logits.shape[-1])
            out[row, width - new:] = logits
        assert out is not None  # step() refuses an all-empty batch
        return out


def _positions(mask: np.ndarray) -> np.ndarray:
    """cumsum(mask) - 1 clamped at 0: what the contract's graphs compute inside (HF generate's rule)."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)


#: Up to this many ids (a decode step's one token, a speculation's few) are checked as Python
#: ints: the numpy masks below cost tens of microseconds a step for one id.
_FEW_IDS = 16


def _ids(tokens: Sequence[int], vocab_size: int | None) -> np.ndarray:
    """Token ids as int64, each checked against the vocabulary (ORT's Gather would fail obscurely)."""
    if isinstance(tokens, (list, tuple)) and len(tokens) <= _FEW_IDS \
            and all(isinstance(t, int) and 0 <= t < (vocab_size or t + 1) for t in tokens):
        return np.asarray(tokens, dtype=np.int64)
    array = np.asarray(list(tokens), dtype=np.int64) if not isinstance(tokens, np.ndarray) else tokens.astype(np.int64)
    if array.ndim != 1:
        raise InputError(f"token ids must be a flat list of integers, got shape {list(array.shape)}")
    bad = array[(array < 0) | (array >= vocab_size)] if vocab_size else array[array < 0]
    if bad.size:
        raise InputError(f"token id {int(bad[0])} is outside the vocabulary (0..{(vocab_size or 0) - 1})")
    return array
