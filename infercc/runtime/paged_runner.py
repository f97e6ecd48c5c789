"""The paged model runner (issue 12's model-runner room): one forward step over rows of many
sequences whose keys and values live in one block pool, each row found through its block table.

The engine (``runtime/engine.py``) decides which rows run and which blocks they own (the block
manager); this runner only computes. A step takes ``PagedRow`` s -- a row's new tokens (a decode
token or a prompt chunk), how many of its tokens the pool already holds, and its blocks -- and
returns each row's last logits, the rows' new K/V written into the pool at their slots.

Two forms, chosen once (``form`` and ``reason`` say which and why):

* ``"c-paged"``: the model runs on the generated-C runtime. ``PagedCacheLowering`` turns a clone
  of the compiled graph into one whose attention is ``PagedAttention`` (``kernels/
  paged_attention.h``): the pools go in as inputs without a copy, and the kernel writes the new
  K/V into them and reads every past key in place.
* ``"ort-gather"``: anything else (ONNX Runtime, an int8 cache, a graph the lowering refused):
  per call, every row's blocks are gathered into a contiguous past [B, kv_heads, P, head_size]
  (left-padded to the longest row), the compiled cached graph runs as ``ModelRunner._run_cached``
  runs it, and the new tokens' K/V are scattered from the presents back into the pool.

Rows of one call share their number of new tokens (the graph's ``sequence`` axis); the runner
groups them by it. Rows with different past lengths share a call only when left padding cannot
change their results (``padding_problem``): each step pads afresh to its longest row, so positions
must come from the mask's values (a CumSum, as our importers' graphs compute them) or from
``position_ids``; a graph that counts positions over the mask's length (torch exports) runs such
rows in calls of their own (``padding`` says why). Either way every row's result is its result
alone.

Not thread-safe: one engine thread steps it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Hashable
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError, InputError
from ..ir import Model
from ..passes.diagnostics import APPLIED, PassRecord
from .c_backend import CBackend, CUnavailable
from .kv_cache import CacheSpec, check_context
from .model_runner import HIDDEN, ModelRunner, _ids
from .paged_padding import padding_problem, positions_from_mask_or_ids  # noqa: F401 (imported from here)
from .tree_attention import graph_problem, row_parents, row_tree_problem, tree_feeds, tree_model

if TYPE_CHECKING:
    from ..compiled import CompiledModel

log = logging.getLogger(__name__)
FORMS = ("c-paged", "ort-gather")


@dataclasses.dataclass
class PagedRow:
    seq_id: Hashable        # the engine's sequence id
    tokens: list[int]       # new token ids of this sequence this step (>= 1: a decode token or a prompt chunk)
    start: int              # position of tokens[0] = tokens already in this sequence's cache
    block_table: list[int]  # its blocks, covering positions [0, start + len(tokens))
    #: Logits of this many trailing tokens come back (1..len(tokens)): 1 for a decode or prompt
    #: chunk; k + 1 to verify k speculated tokens; len(tokens) for a prompt's per-token scores.
    num_logits: int = 1
    #: Its LoRA adapter (an ``infercc.lora.AdapterRef``), None for the base model: rows with one
    #: run the LoRA graph variant (lora/registry.py), on the same pool, by the gather form.
    adapter: object = None
    #: A tree of candidates (runtime/tree_attention.py): the parent of each of ``tokens`` within
    #: the row (-1: the row's past; parents before children, depths non-decreasing), None = the
    #: tokens follow one another. Only where ``PagedRunner.tree_reason()`` is None.
    tree: list[int] | None = None


class PagedRunner:
    """Owns the pool (one array per cached tensor, [num_blocks, kv_heads, block_size, width]) and
    runs steps over it; see the module docstring."""

    def __init__(self, compiled: CompiledModel, num_blocks: int, block_size: int, *, form: str = "auto") -> None:
        """``form``: "auto" (c-paged where possible, else ort-gather), or one of ``FORMS`` to insist
        (ConfigError when "c-paged" is not possible, with the reason)."""
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"PagedRunner: {name} must be a positive integer, got {value!r}")
        if form not in ("auto", *FORMS):
            raise ConfigError(f"PagedRunner: form must be 'auto' or one of {list(FORMS)}, got {form!r}")
        self.compiled = compiled
        self.num_blocks, self.block_size = num_blocks, block_size
        self.cache_spec = _spec(compiled)
        #: K+V bytes of all layers for block_size tokens (to size the pool from Config.kv_cache_memory).
        self.bytes_per_block = self.cache_spec.bytes_per_token * block_size
        #: The paged-cache lowering's record (per layer: applied, or skipped with the reason); None
        #: when the lowering was not tried (ONNX Runtime, or form="ort-gather").
        self.lowering: PassRecord | None = None
        self.paged_model: Model | None = None
        backend, why = (None, "form='ort-gather' was asked for") if form == "ort-gather" else self._paged_backend()
        if backend is not None:
            self.form = "c-paged"
            self.reason = "generated C: PagedAttention writes the new K/V into the pool and reads the past in place"
        elif form == "c-paged":
            raise ConfigError(f"PagedRunner: form='c-paged' is not possible for this model: {why}; use form='auto'")
        else:
            backend = compiled.backend
            self.form = "ort-gather"
            self.reason = (f"blocks gathered into the contiguous cached graph ({compiled.runtime_reason or compiled.runtime}) "
                           f"and the new K/V scattered back: {why}")
        self.backend = backend
        #: The cached graph's interface (inputs it takes, vocabulary, context) as the contiguous runner reads it.
        self.interface = ModelRunner(backend, compiled.model)
        self.max_context = self.interface.max_context
        #: Why rows with different past lengths run in separate calls (None: they share calls).
        # (an analysis of the whole graph, ~0.1 s for a 30-layer model: once per compiled model,
        # not once per engine, i.e. per generate call)
        memo = compiled.__dict__.setdefault("_padding_problems", {})
        key = (id(compiled.model), self.form == "ort-gather")
        if key not in memo:
            memo[key] = padding_problem(compiled.model, masked_keys=key[1])
        self.padding = memo[key]
        self.pools = self._allocate()
        from ..passes.kv_cache.paged import pool_for

        #: The paged graph's pool input of each pool (worked out once, not per step).
        self._pool_names = {name: pool_for(name) for name in self.pools}
        #: The last step's final hidden states [sum(num_logits), hidden], rows as its logits, when
        #: the graph exposes them (compiled for Medusa heads); None otherwise.
        self.last_hidden: np.ndarray | None = None
        self._group_hidden: np.ndarray | None = None
        #: Graph runs so far (a step runs one per group of rows; for tests and metrics).
        self.runs = 0
        #: (the tree variant's backend, None) or (None, why trees are off); built on first ask.
        self._tree: tuple[object | None, str | None] | None = None
        log.info("paged KV cache: %s (%s); %d blocks of %d tokens, %d bytes each%s", self.form, self.reason,
                 num_blocks, block_size, self.bytes_per_block,
                 f"; rows of different past lengths run apart: {self.padding}" if self.padding else "")

    # -- the door -------------------------------------------------------------------------------
    @staticmethod
    def bytes_per_token(compiled: CompiledModel) -> int:
        """Cache bytes one token of one sequence takes (all layers, keys and values, int8 scales)."""
        return _spec(compiled).bytes_per_token

    def step(self, rows: list[PagedRow]) -> np.ndarray:
        """float32 logits of each row's last ``num_logits`` tokens, rows in order, stacked
        [sum(num_logits), vocab] ([len(rows), vocab] when every row asks for one); the rows' new K/V
        are written into the pool at their slots. InputError (nothing written) for a malformed row."""
        if not rows:
            raise InputError("PagedRunner.step: no rows to run")
        ids = self._check(rows)
        groups: dict[tuple[int, int | None], list[int]] = {}
        for i, row in enumerate(rows):
            lora = row.adapter is not None
            apart = self._lora_padding() if lora else self.padding
            groups.setdefault((len(row.tokens), row.start if apart else None, lora), []).append(i)
        offsets = np.cumsum([0] + [row.num_logits for row in rows])
        out = self._direct_out(rows, groups, int(offsets[-1]))
        direct = out is not None
        self.last_hidden = None
        for members in groups.values():
            group = [rows[i] for i in members]
            keep = max(r.num_logits for r in group)
            into = out.reshape(len(rows), keep, -1) if direct else None
            logits = self._run(group, np.stack([ids[i] for i in members]), keep, into)
            if out is None:
                out = np.empty((int(offsets[-1]), logits.shape[-1]), np.float32)
            hidden = self._group_hidden
            if hidden is not None:
                hidden = hidden.reshape(len(group), -1, hidden.shape[-1])
                if self.last_hidden is None:
                    self.last_hidden = np.empty((int(offsets[-1]), hidden.shape[-1]), np.float32)
            for b, i in enumerate(members):
                if into is None:
                    out[offsets[i]:offsets[i + 1]] = logits[b, logits.shape[1] - rows[i].num_logits:]
                if hidden is not None:
                    self.last_hidden[offsets[i]:offsets[i + 1]] = hidden[b, hidden.shape[1] - rows[i].num_logits:]
        assert out is not None
        return out

    def _direct_out(self, rows: list[PagedRow], groups: dict, total: int) -> np.ndarray | None:
        """The step's output array when the graph can write its logits straight into it (one
        group, every row asking for the same number of logits, the graph keeping only those,
        float32 logits of a known vocabulary: a decode step), else None. Saves allocating the
        group's buffer and copying [rows, vocab] float32 out of it every step (2 x 196 KB for
        SmolLM2 at batch 1)."""
        vocab = self.interface.vocab_size
        keep = rows[0].num_logits
        if (len(groups) != 1 or vocab is None or self.interface.logits_dtype != np.float32
                or (keep != len(rows[0].tokens) and not self.interface.keeps_logits)
                or any(row.num_logits != keep for row in rows)):
            return None
        return np.empty((total, vocab), np.float32)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: pool block src -> dst for each (src, dst), in every layer's keys and values."""
        if not pairs:
            return
        src, dst = (np.asarray([p[i] for p in pairs], np.int64) for i in (0, 1))
        bad = [p for p in pairs if not all(isinstance(x, (int, np.integer)) and 0 <= x < self.num_blocks for x in p)]
        if bad:
            raise InputError(f"PagedRunner.copy_blocks: pair {bad[0]} names a block outside the pool of "
                             f"{self.num_blocks} blocks (ids 0..{self.num_blocks - 1})")
        for pool in self.pools.values():
            pool[dst] = pool[src]

    def tree_reason(self) -> str | None:
        """None when rows may carry a tree of candidates (``PagedRow.tree``), else why not (the
        proposers then keep chains). The first call builds the tree variant of the paged graph."""
        if self._tree is None:
            self._tree = self._tree_backend()
        return self._tree[1]

    def compact(self, block_table: list[int], moves: list[tuple[int, int]]) -> None:
        """Move tokens' K/V within one sequence, (from, to) token positions in order, in every
        layer's pools (``tree_attention.compact_moves``: the accepted path of a tree row)."""
        bs = self.block_size
        for src, dst in moves:
            for pool in self.pools.values():
                pool[block_table[dst // bs], :, dst % bs] = pool[block_table[src // bs], :, src % bs]

    def release(self, seq_id: Hashable) -> None:
        """The sequence ended or was preempted: nothing to do (no per-sequence state; the block
        manager owns the blocks)."""

    # -- checks -----------------------------------------------------------------------------------
    def _check(self, rows: list[PagedRow]) -> list[np.ndarray]:
        """Each row's token ids (int64, checked against the vocabulary), or InputError naming the
        row and the fix, before anything is written."""
        seen: set = set()
        ids = []
        bs = self.block_size
        for i, row in enumerate(rows):
            where = f"PagedRunner.step: row {i} (sequence {row.seq_id!r})"
            if row.seq_id in seen:
                raise InputError(f"{where} appears twice in one step; give each sequence one row per step")
            seen.add(row.seq_id)
            if len(row.tokens) == 0:
                raise InputError(f"{where} has no new tokens; leave it out of the step")
            if not isinstance(row.num_logits, (int, np.integer)) or not 1 <= row.num_logits <= len(row.tokens):
                raise InputError(f"{where} asks for {row.num_logits!r} logits; it must be in 1..{len(row.tokens)} "
                                 "(at most one per new token)")
            if not isinstance(row.start, (int, np.integer)) or row.start < 0:
                raise InputError(f"{where} has start {row.start!r}; it must be the number of tokens already cached (>= 0)")
            total = int(row.start) + len(row.tokens)
            check_context(total, self.max_context)
            need = -(-total // bs)
            if len(row.block_table) < need:
                raise InputError(f"{where} has {len(row.block_table)} block(s) for {total} tokens; it needs {need} of "
                                 f"{bs} tokens (allocate them before the step)")
            table = row.block_table[:need]
            bad = [b for b in table if not isinstance(b, (int, np.integer)) or not 0 <= b < self.num_blocks]
            if bad:
                raise InputError(f"{where} names block {bad[0]!r}, outside the pool of {self.num_blocks} blocks "
                                 f"(ids 0..{self.num_blocks - 1})")
            if row.tree is not None:
                self._check_tree(row, where)
            try:
                ids.append(_ids(row.tokens, self.interface.vocab_size))
            except InputError as exc:
                raise InputError(f"{where}: {exc}") from None
        return ids

    def _check_tree(self, row: PagedRow, where: str) -> None:
        problem = row_tree_problem(row.tree, len(row.tokens))
        if problem is not None:
            raise InputError(f"{where}: its tree {problem}; give the parent of each token (-1 for the first)")
        if row.adapter is not None:
            raise InputError(f"{where} carries a tree and a LoRA adapter; adapter rows verify chains")
        reason = self.tree_reason()
        if reason is not None:
            raise InputError(f"{where} carries a tree but this runner cannot run trees: {reason}; send a chain")

    # -- running ----------------------------------------------------------------------------------
    def _feeds(self, rows: list[PagedRow], ids: np.ndarray, keep: int) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
        """input_ids, attention_mask left-padded to the longest past, position_ids and
        logits_to_keep (``keep`` trailing positions) as the graph takes them; and the rows' past
        lengths and the longest."""
        pasts = np.asarray([row.start for row in rows], np.int64)
        width = int(pasts.max())
        s = ids.shape[1]
        mask = (np.arange(width + s)[None, :] >= (width - pasts)[:, None]).astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if self.interface.has_positions:
            feeds["position_ids"] = pasts[:, None] + np.arange(s, dtype=np.int64)[None, :]
        if self.interface.keeps_logits:
            feeds["logits_to_keep"] = np.asarray(keep, np.int64)
        return feeds, pasts, width

    def _logits_buffer(self, batch: int, width: int) -> np.ndarray | None:
        vocab = self.interface.vocab_size
        return None if vocab is None else np.empty((batch, width, vocab), self.interface.logits_dtype)

    def _run(self, rows: list[PagedRow], ids: np.ndarray, keep: int, into: np.ndarray | None = None) -> np.ndarray:
        """float32 logits of the group's last ``keep`` positions [len(rows), keep, vocab]
        (written into ``into`` when given: ``_direct_out``)."""
        feeds, pasts, width = self._feeds(rows, ids, keep)
        self.runs += 1
        s = ids.shape[1]
        out_width = keep if self.interface.keeps_logits else s
        buffer = into if into is not None and into.shape[1] == out_width else self._logits_buffer(len(rows), out_width)
        if rows[0].adapter is not None:  # (a group's rows all have adapters, or none has)
            refs = [row.adapter for row in rows]
            paged = self.compiled.lora.view(refs, self.block_size) if self.form == "c-paged" else None
            if paged is not None and paged.paged_backend() is not None:
                logits = self._run_paged(rows, feeds, pasts, s, buffer, paged)
            else:
                logits = self._run_gather(rows, feeds, pasts, width, s, buffer, self.compiled.lora.view(refs))
        elif self.form == "c-paged" and any(row.tree is not None for row in rows):
            feeds.update(tree_feeds([row_parents(row.tree, s) for row in rows], pasts, width,
                                    self.interface.has_positions))
            logits = self._run_paged(rows, feeds, pasts, s, buffer, self._tree[0])
        elif self.form == "c-paged":
            logits = self._run_paged(rows, feeds, pasts, s, buffer, self.backend)
        elif any(row.tree is not None for row in rows):  # the ONNX Runtime tree variant (tree_ort.py)
            tree = self._tree[0]
            feeds.update(tree_feeds([row_parents(row.tree, s) for row in rows], pasts, width, tree.positions))
            logits = self._run_gather(rows, feeds, pasts, width, s, buffer, tree.backend)
        else:
            logits = self._run_gather(rows, feeds, pasts, width, s, buffer, self.backend)
        if self.interface.vocab_size is None:
            self.interface.vocab_size = int(logits.shape[-1])
        return logits[:, logits.shape[1] - keep:].astype(np.float32, copy=False)

    def _run_paged(self, rows: list[PagedRow], feeds: dict, pasts: np.ndarray, s: int, buffer: np.ndarray | None,
                   backend) -> np.ndarray:
        """The group's logits, written into ``buffer`` (None: the backend allocates them)."""
        self._paged_feeds(rows, feeds, pasts, s)
        return self._bound(backend, feeds, {"logits": buffer})["logits"]

    def _paged_feeds(self, rows: list[PagedRow], feeds: dict, pasts: np.ndarray, s: int) -> None:
        """Add the block tables, past lengths and pools to ``feeds``."""
        from ..passes.kv_cache.paged import BLOCK_TABLES, PAST_LENS

        need = -(-(pasts + s) // self.block_size)
        tables = np.zeros((len(rows), int(need.max())), np.int32)  # padded with block 0 (never read)
        for b, row in enumerate(rows):
            tables[b, :need[b]] = row.block_table[:need[b]]
        feeds[BLOCK_TABLES] = tables
        feeds[PAST_LENS] = pasts.astype(np.int32)
        names = self._pool_names
        for name, pool in self.pools.items():  # the pools themselves: the kernel writes into them
            feeds[names[name]] = pool

    def step_greedy(self, rows: list[PagedRow]) -> np.ndarray | None:
        """The argmax id of each row's last logits (int64 [len(rows)]: numpy's argmax, ties to the
        lowest id), taken in C without copying the logits out, for a step whose every row samples
        greedily without penalties or logprobs (the engine decides); None when this step cannot
        run so (not the C paged form, rows of several shapes, trees, adapters, more than one
        logits row, a graph exposing its hidden state): call ``step``. Why: at batch 16 copying
        the [16, 49152] float32 logits of SmolLM2 out of the library and arg-maxing them in numpy
        was ~0.4 ms of a step's ~1 ms of Python."""
        if (self.form != "c-paged" or self.interface.has_hidden or len({len(r.tokens) for r in rows}) != 1
                or (self.padding and len({r.start for r in rows}) != 1)
                or any(r.adapter is not None or r.tree is not None or r.num_logits != 1 for r in rows)):
            return None
        ids = self._check(rows)
        feeds, pasts, _ = self._feeds(rows, np.stack(ids), 1)
        self.runs += 1
        self.last_hidden = None
        self._paged_feeds(rows, feeds, pasts, len(rows[0].tokens))
        chosen = self.backend.run_bound(feeds, {"logits": None}, argmax=("logits",))["logits"]
        return chosen.reshape(len(rows), -1)[:, -1]

    def _run_gather(self, rows: list[PagedRow], feeds: dict, pasts: np.ndarray, width: int, s: int,
                    buffer: np.ndarray | None, backend) -> np.ndarray:
        bs = self.block_size
        slots = []  # per row: (blocks, offsets) of its past, and of its new tokens
        for row in rows:
            past, new = np.arange(row.start), np.arange(row.start, row.start + s)
            table = np.asarray(row.block_table, np.int64)
            slots.append(((table[past // bs], past % bs), (table[new // bs], new % bs)))
        outputs: dict[str, np.ndarray | None] = {"logits": buffer}
        for entry in self.cache_spec.entries:
            pool = self.pools[entry.input]
            past = np.zeros((len(rows), entry.heads, width, entry.width), entry.dtype)
            for b, ((blocks, offsets), _) in enumerate(slots):
                if len(blocks):  # left-padded: the row's tokens are the last ones
                    past[b, :, width - len(blocks):] = pool[blocks, :, offsets].transpose(1, 0, 2)
            feeds[entry.input] = past
            outputs[entry.output] = None
        result = self._bound(backend, feeds, outputs)
        for entry in self.cache_spec.entries:
            present, pool = result[entry.output], self.pools[entry.input]
            for b, (_, (blocks, offsets)) in enumerate(slots):
                pool[blocks, :, offsets] = present[b, :, width:width + s].transpose(1, 0, 2)
        return result["logits"]

    def _lora_padding(self) -> str | None:
        """Why adapter rows of different past lengths run apart: as base rows where they run a
        paged variant, else (the gather form, whose padded past is attended over) worked out once."""
        if self.form == "ort-gather":
            return self.padding
        if not hasattr(self, "_lora_pad"):
            paged = self.compiled.lora.view([], self.block_size).paged_backend()
            self._lora_pad = self.padding if paged is not None else padding_problem(self.compiled.model, masked_keys=True)
        return self._lora_pad

    def _bound(self, backend, feeds: dict, outputs: dict) -> dict[str, np.ndarray]:
        """``backend.run_bound``, the exposed hidden state kept in ``_group_hidden`` when there is one
        (LoRA variants and merged copies are made from the compiled graph: they expose it too)."""
        if self.interface.has_hidden:
            outputs[HIDDEN] = None
        result = backend.run_bound(feeds, outputs)
        self._group_hidden = result.get(HIDDEN)
        return result

    def _allocate(self) -> dict[str, np.ndarray]:
        """One zeroed pool per cached tensor, by its past input's name (np.zeros: pages are touched
        only when blocks are written)."""
        total = self.bytes_per_block * self.num_blocks
        try:
            return {e.input: np.zeros((self.num_blocks, e.heads, self.block_size, e.width), e.dtype)
                    for e in self.cache_spec.entries}
        except MemoryError:
            raise ConfigError(f"PagedRunner: a KV pool of {self.num_blocks} blocks x {self.bytes_per_block} bytes "
                              f"({total} bytes) does not fit in memory; lower Config.kv_cache_memory") from None

    def _tree_backend(self) -> tuple[object | None, str | None]:
        """The tree variant's backend, or (None, why not): c-paged, the C library of
        tree_attention.tree_model (one per compiled model and block size, as the paged one);
        ort-gather, ONNX Runtime's (tree_ort.tree_variant, one per compiled model)."""
        if self.form == "ort-gather":
            from .tree_ort import tree_variant

            if isinstance(self.backend, CBackend):  # (asked for the gather form on the C runtime)
                return None, "the gather form on the generated-C runtime: trees need the C paged form (form='auto')"
            return tree_variant(self.compiled)
        if self.paged_model is None:
            return None, "the runner has no paged graph to make a tree variant of"
        memo = self.compiled.__dict__.setdefault("_paged_tree_backends", {})
        if self.block_size not in memo:
            why = graph_problem(self.compiled.model)
            backend = None
            if why is None:
                config = self.compiled.config
                try:
                    backend = CBackend(tree_model(self.paged_model), intra_op_threads=config.intra_op_threads,
                                       kernels=self.compiled.kernels,
                                       share=self.backend if isinstance(self.backend, CBackend) else None)
                except CUnavailable as exc:
                    why = f"the generated-C runtime cannot build the tree graph ({exc})"
            memo[self.block_size] = (backend, why)
        return memo[self.block_size]

    def _paged_backend(self) -> tuple[CBackend | None, str]:
        """The C library of the paged graph, or (None, why not)."""
        from ..passes.cleanup.dce import DeadCodeElimination
        from ..passes.kv_cache.paged import PagedCacheLowering
        from ..passes.lowering import wants_c
        from ..passes.manager import PassManager

        compiled, config = self.compiled, self.compiled.config
        if not wants_c(config):
            return None, (f"the model runs on ONNX Runtime (Config.backend={config.backend!r}); PagedAttention is a "
                          "generated-C kernel")
        made = getattr(compiled, "_backend", None)  # the C runtime already failed for this model
        if made is not None and not isinstance(made, CBackend):
            return None, compiled.runtime_reason or "the model runs on ONNX Runtime"
        # One paged library per compiled model and block size: every engine (each generate([...])
        # call, the server's) reuses it instead of lowering and loading the graph again.
        memo = compiled.__dict__.setdefault("_paged_backends", {})
        if self.block_size not in memo:
            manager = PassManager([PagedCacheLowering(self.block_size), DeadCodeElimination()], config.replace(strict=False))
            paged, diagnostics = manager.run(compiled.model.clone())
            lowering, backend, why = diagnostics[PagedCacheLowering.name], None, ""
            if lowering.status != APPLIED:
                why = f"the paged lowering left the graph alone ({'; '.join(lowering.reasons)})"
            else:
                try:
                    backend = CBackend(paged, intra_op_threads=config.intra_op_threads, kernels=compiled.kernels,
                                       share=made if isinstance(made, CBackend) else None)
                except CUnavailable as exc:
                    why = f"the generated-C runtime cannot run the paged graph ({exc})"
            memo[self.block_size] = (lowering, paged if backend is not None else None, backend, why)
        self.lowering, self.paged_model, backend, why = memo[self.block_size]
        return backend, why


def built_paged_backend(compiled: CompiledModel) -> CBackend | None:
    """A paged C library already built for ``compiled`` (any block size), or None: the plain
    library built after it reads that one's weight bytes (CBackend's ``share``)."""
    built = compiled.__dict__.get("_paged_backends", {}).values()
    return next((backend for _, _, backend, _ in built if backend is not None), None)


def _spec(compiled: CompiledModel) -> CacheSpec:
    spec = CacheSpec.from_model(compiled.model)
    if spec is None:
        raise ConfigError("the model was compiled without a KV cache (no past_key_values.* inputs), so it has nothing "
                          "to page; compile it with kv_cache=True (the default for causal LMs)")
    return spec
