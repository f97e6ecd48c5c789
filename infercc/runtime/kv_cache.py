"""The KV-cache manager: what a batch of sequences has seen so far, kept between forward steps.

The cached-graph contract (what a KV-cache insertion pass must produce for the runtime to use):
inputs ``input_ids`` [batch, seq] int64, ``attention_mask`` [batch, past+seq] int64 (1 = real
token, 0 = padding, anywhere; the graph derives positions from it, cumsum(mask) - 1), and per
layer i ``past_key_values.{i}.key`` / ``.value`` [batch, kv_heads, past, head_size] (float32 or
float16); outputs ``logits`` [batch, seq, vocab] and ``present.{i}.key`` / ``.value`` [batch,
kv_heads, past+seq, head_size], the past followed by this step's keys/values. Any other
``past_key_values.X`` input with a ``present.X`` output of the same rank-4 layout (an int8
``.scale``, say) is cached the same way. A graph without these inputs runs uncached.

A ``KVCache`` holds, for ``batch`` rows that advance together, the token ids and the attention
mask of every cache slot (1 = a real token, 0 = left padding) and, for a model compiled with a
cache (see ``CacheSpec``), each layer's key and value tensors. For a model without one it holds
only the token history, which the model runner feeds again in full each step.

Why a flat ping-pong buffer per tensor: the cached-graph contract takes ``past`` [batch, heads,
past, head_size] and returns ``present`` [batch, heads, past+seq, head_size]. Any prefix of a flat
buffer reshaped to [batch, heads, length, head_size] is C-contiguous, so the cache feeds ONNX
Runtime a view without copying, and ORT writes ``present`` straight into the other buffer of the
pair (bound with IOBinding); after the step the two swap. Buffers grow by doubling (capped at
the model's context), so a long generation reallocates O(log n) times, never per token.

Shared buffers (``CacheSpec.shared``): when every cache tensor is read and written only by
GroupQueryAttention nodes (the ORT lowering's kernel, passes/kv_cache/gqa.py), one buffer
[batch, heads, capacity, head_size] per tensor is bound as both past and present. The kernel
takes the lengths from ``attention_mask`` (``seqlens_k``), writes only the new tokens' slots in
place and never reads past the total length, so a step copies nothing of the past at all -- the
ping-pong pair copies it once per step into the other buffer, O(length) per layer. The generated-C
runtime's attention appends in place too (``CacheSpec.rows_only``): it takes the buffer's first
``length`` rows as a strided view, its heads ``capacity`` rows apart, writes the new rows after
them, and returns that same buffer as the present (codegen ``icc_run``'s rooms).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import InferccError, InputError, ModelLoadError
from ..ir import Model

#: Smallest capacity allocated: short prompts do not pay for repeated early doublings.
MIN_CAPACITY = 64
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."


class ContextOverflowError(InferccError):
    """A sequence would grow beyond the model's maximum context."""


def check_context(tokens: int, max_context: int | None) -> None:
    """Raise ContextOverflowError when ``tokens`` do not fit in ``max_context``."""
    if max_context is not None and tokens > max_context:
        raise ContextOverflowError(
            f"sequence of {tokens} tokens exceeds the model's maximum context {max_context}; shorten the "
            "prompt, lower max_new_tokens, or reset() the sequence (session(max_context=N) overrides the "
            "limit when the model is known to handle longer sequences)"
        )


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """One cached tensor: fed as ``input``, returned grown as ``output``, [batch, heads, T, width]."""

    input: str
    output: str
    dtype: np.dtype
    heads: int
    width: int

    @property
    def bytes_per_token(self) -> int:
        return self.heads * self.width * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """The cache tensors of a compiled graph, found by the contract's names."""

    entries: tuple[CacheEntry, ...]
    #: Past and present may be one buffer (every cache tensor read and written in place by
    #: GroupQueryAttention); see the module docstring.
    shared: bool = False
    #: With ``shared``: the past goes in as the buffer's first ``length`` rows, a strided view the
    #: generated C's attention appends to in place (``CBackend.grows_in_place``), instead of the
    #: whole buffer GroupQueryAttention takes with the lengths from the mask.
    rows_only: bool = False

    @property
    def layers(self) -> int:
        return len({e.input[len(PAST_PREFIX):].split(".")[0] for e in self.entries})

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token of one sequence takes (all layers, keys and values)."""
        return sum(e.bytes_per_token for e in self.entries)

    @classmethod
    def from_model(cls, model: Model) -> CacheSpec | None:
        """The spec of a graph with ``past_key_values.*`` inputs, None for a graph without them."""
        from ..importers import read_metadata

        meta = read_metadata(model)
        outputs = {v.name: v for v in model.graph.outputs}
        entries = []
        for value in model.graph.inputs:
            if not value.name.startswith(PAST_PREFIX) or value.const is not None:
                continue
            out_name = PRESENT_PREFIX + value.name[len(PAST_PREFIX):]
            if out_name not in outputs:
                raise ModelLoadError(
                    f"the model takes {value.name!r} but has no output {out_name!r}: a cached graph returns "
                    "present.{i}.key/value for every past_key_values.{i}.key/value; recompile the model"
                )
            shape = value.shape or (None, None, None, None)
            if len(shape) != 4:
                raise ModelLoadError(f"cache input {value.name!r} must be [batch, kv_heads, past, head_size], got {shape}")
            heads = shape[1] if isinstance(shape[1], int) else meta.get("num_kv_heads")
            width = shape[3] if isinstance(shape[3], int) else meta.get("head_dim")
            if heads is None or width is None or value.dtype is None:
                raise ModelLoadError(
                    f"cache input {value.name!r} has no static kv_heads/head_size/dtype ({value.dtype}{list(shape)}) "
                    "and the model's metadata does not give infercc.num_kv_heads/head_dim"
                )
            entries.append(CacheEntry(value.name, out_name, np.dtype(value.dtype.numpy), int(heads), int(width)))
        return cls(tuple(entries), shared_in_place(model, entries)) if entries else None


def shared_in_place(model: Model, entries: list[CacheEntry]) -> bool:
    """Whether each past input is read only by GroupQueryAttention nodes (as past_key/past_value)
    and each present output is the same node's present: then one buffer can be both."""
    outputs = {v.name: v for v in model.graph.outputs}
    inputs = {v.name: v for v in model.graph.inputs}
    for entry in entries:
        past, present = inputs[entry.input], outputs[entry.output]
        node = present.producer
        if node is None or node.op_type != "GroupQueryAttention" or present.index not in (1, 2):
            return False
        if not past.uses or any(use is not node or slot != present.index + 2 for use, slot in past.uses):
            return False
    return True


class KVCache:
    """Token history, attention mask and (for cached graphs) K/V tensors of ``batch`` rows that
    share one padded length. Not thread-safe: its owner (a Sequence, a generate call) serializes."""

    def __init__(self, spec: CacheSpec | None, batch: int, max_context: int | None = None) -> None:
        self.spec = spec
        self.batch = batch
        self.max_context = max_context
        self.length = 0  # slots used, padding included
        self.capacity = 0
        self.ids = np.zeros((batch, 0), np.int64)
        self.mask = np.zeros((batch, 0), np.int64)
        self._front: dict[str, np.ndarray] = {}  # the current past, flat
        self._back: dict[str, np.ndarray] = {}  # where the next present is written, flat

    # -- growth -------------------------------------------------------------------------------
    def append(self, ids: np.ndarray, mask: np.ndarray) -> None:
        """Record ``ids``/``mask`` [batch, s] as the next slots (tensors follow via ``commit``).
        Raises ContextOverflowError, before changing anything, when a row's real tokens would
        exceed the model's context."""
        check_context(int((self.real_lengths() + mask.sum(axis=1)).max(initial=0)), self.max_context)
        new_length = self.length + ids.shape[1]
        self.reserve(new_length)
        self.ids[:, self.length:new_length] = ids
        self.mask[:, self.length:new_length] = mask

    def reserve(self, length: int) -> None:
        """Make room for ``length`` slots: buffers double (at least MIN_CAPACITY, at most the
        model's context unless padding needs more)."""
        if length <= self.capacity:
            return
        capacity = max(length, 2 * self.capacity, MIN_CAPACITY)
        if self.max_context is not None:
            capacity = max(length, min(capacity, self.max_context))
        self.ids = _grown(self.ids, capacity, self.length)
        self.mask = _grown(self.mask, capacity, self.length)
        for entry in self.spec.entries if self.spec else ():
            if self.shared:  # one [batch, heads, capacity, width] buffer, slots kept in place
                grown = np.empty((self.batch, entry.heads, capacity, entry.width), entry.dtype)
                if self.length:
                    grown[:, :, :self.length] = self._front[entry.input][:, :, :self.length]
                self._front[entry.input] = grown
                continue
            size = self.batch * entry.heads * capacity * entry.width
            front = np.empty(size, entry.dtype)
            used = self.batch * entry.heads * self.length * entry.width
            if used:
                front[:used] = self._front[entry.input][:used]
            self._front[entry.input] = front
            self._back[entry.input] = np.empty(size, entry.dtype)
        self.capacity = capacity

    @property
    def shared(self) -> bool:
        return bool(self.spec and self.spec.shared)

    # -- views for the runner -----------------------------------------------------------------
    def past(self) -> dict[str, np.ndarray]:
        """Contiguous views [batch, heads, length, width] of the cached tensors, by input name
        (shared buffers: the whole [batch, heads, capacity, width] buffer, or with ``rows_only``
        its first ``length`` rows)."""
        if self.shared:
            if self.spec.rows_only:
                return {e.input: self._front[e.input][:, :, :self.length] for e in self._entries()}
            return {e.input: self._front[e.input] for e in self._entries()}
        return {e.input: self._view(self._front[e.input], e, self.length) for e in self._entries()}

    def present(self, length: int) -> dict[str, np.ndarray]:
        """Where the step writes its grown tensors, [batch, heads, length, width], by output name
        (shared buffers: the same buffers as ``past``, written in place; with ``rows_only`` their
        first ``length`` rows)."""
        if self.shared:
            if self.spec.rows_only:
                return {e.output: self._front[e.input][:, :, :length] for e in self._entries()}
            return {e.output: self._front[e.input] for e in self._entries()}
        return {e.output: self._view(self._back[e.input], e, length) for e in self._entries()}

    def commit(self, length: int) -> None:
        """The step wrote ``present``: it becomes the past; ``length`` slots are now in use."""
        if not self.shared:
            self._front, self._back = self._back, self._front
        self.length = length

    def advance(self, length: int) -> None:
        """Uncached graphs: the appended ids are the whole state."""
        self.length = length

    def truncate(self, length: int) -> None:
        """Forget every slot from ``length`` on (speculated tokens that were rejected, a user's
        rewind): later steps write there again. In-place buffers only move the length; a ping-pong
        pair is laid out by length, so the kept slots are copied once into the other buffer."""
        if not 0 <= length <= self.length:
            raise InputError(f"cannot truncate a cache of {self.length} slots to {length}; keep 0..{self.length}")
        if length == self.length:
            return
        self.ids[:, length:self.length] = 0
        self.mask[:, length:self.length] = 0
        if not self.shared:
            for entry in self._entries():
                old = self._view(self._front[entry.input], entry, self.length)
                self._view(self._back[entry.input], entry, length)[:] = old[:, :, :length]
            self._front, self._back = self._back, self._front
        self.length = length

    def move(self, moves: list[tuple[int, int]]) -> None:
        """Copy slots within every row, (from, to) in order, in every cached tensor: a verified
        tree's accepted path brought to consecutive slots (``tree_attention.compact_moves``)
        before ``truncate`` drops the rest. Ids and mask follow the K/V."""
        for src, dst in moves:
            if not (0 <= src < self.length and 0 <= dst < self.length):
                raise InputError(f"cannot move slot {src} to {dst} in a cache of {self.length} slots")
            self.ids[:, dst], self.mask[:, dst] = self.ids[:, src], self.mask[:, src]
            for entry in self._entries():
                view = self._front[entry.input] if self.shared else self._view(self._front[entry.input], entry,
                                                                               self.length)
                view[:, :, dst] = view[:, :, src]

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (finished sequences leave a batch, so later steps do not compute
        them); leading slots that are padding in every kept row are dropped as well. Positions
        come from the mask, so removing all-padding slots changes no result."""
        mask = self.mask[rows, : self.length]
        real = np.flatnonzero(mask.any(axis=0))
        start = int(real[0]) if real.size else self.length
        length = self.length - start
        ids, self.ids = self.ids, np.zeros((len(rows), self.capacity), np.int64)
        self.ids[:, :length] = ids[rows, start : self.length]
        self.mask = np.zeros((len(rows), self.capacity), np.int64)
        self.mask[:, :length] = mask[:, start:]
        old_batch, self.batch = self.batch, len(rows)
        for entry in self._entries():
            if self.shared:
                kept = np.empty((self.batch, entry.heads, self.capacity, entry.width), entry.dtype)
                kept[:, :, :length] = self._front[entry.input][rows, :, start:self.length]
                self._front[entry.input] = kept
                continue
            old = self._front[entry.input][: old_batch * entry.heads * self.length * entry.width]
            old = old.reshape(old_batch, entry.heads, self.length, entry.width)
            size = self.batch * entry.heads * self.capacity * entry.width
            self._front[entry.input] = np.empty(size, entry.dtype)
            self._back[entry.input] = np.empty(size, entry.dtype)
            self._view(self._front[entry.input], entry, length)[:] = old[rows, :, start:]
        self.length = length

    def _entries(self) -> tuple[CacheEntry, ...]:
        return self.spec.entries if self.spec else ()

    def _view(self, flat: np.ndarray, entry: CacheEntry, length: int) -> np.ndarray:
        return flat[: self.batch * entry.heads * length * entry.width].reshape(self.batch, entry.heads, length, entry.width)

    # -- what it holds ------------------------------------------------------------------------
    def real_lengths(self) -> np.ndarray:
        """Real (non-padding) tokens per row."""
        return self.mask[:, : self.length].sum(axis=1)

    def tokens(self, row: int = 0) -> list[int]:
        """The real token ids of ``row``, padding left out."""
        keep = self.mask[row, : self.length].astype(bool)
        return self.ids[row, : self.length][keep].tolist()

    @property
    def bytes_per_token(self) -> int:
        """K/V bytes one more slot costs for the whole batch (0 for an uncached graph)."""
        return self.batch * self.spec.bytes_per_token if self.spec else 0

    @property
    def nbytes(self) -> int:
        """Bytes allocated now: both buffers of each tensor, plus ids and mask."""
        tensors = sum(a.nbytes for a in self._front.values()) + sum(a.nbytes for a in self._back.values())
        return tensors + self.ids.nbytes + self.mask.nbytes

    def free(self) -> None:
        """Drop every buffer; the cache is empty and can grow again."""
        self._front, self._back = {}, {}
        self.ids = np.zeros((self.batch, 0), np.int64)
        self.mask = np.zeros((self.batch, 0), np.int64)
        self.length = self.capacity = 0


def _grown(array: np.ndarray, capacity: int, used: int) -> np.ndarray:
    out = np.zeros((array.shape[0], capacity), array.dtype)
    out[:, :used] = array[:, :used]
    return out
