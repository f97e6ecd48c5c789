"""Sessions and sequences: stateful, step-by-step use of a compiled model.

A ``Session`` (``compiled.session()``) owns the model runner and every ``Sequence`` made from it;
``session.close()`` frees all their caches. A ``Sequence`` is one independent text: its own
KV cache, token history, sampler (params + seeded generator) and lock. Sequences never share
state, so several threads may drive several sequences at once (ONNX Runtime's ``run`` is
thread-safe); the lock makes a single sequence safe to share too, one step at a time.

Sequences step in Python on every runtime: a sequence hands out its logits and keeps its cache after
each ``prefill``/``append``/``decode``, which the generated-C decode loop (runtime/c_generate.py,
used by ``generate``/``stream``) keeps inside the library; each step is still one C forward run.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InferccError, InputError
from .model_runner import ModelRunner
from .sampling import Sampler, SamplingParams

if TYPE_CHECKING:
    from ..compiled import CompiledModel
    from .tokenizer import Tokenizer

Tokens = str | Seq[int] | np.ndarray


class SessionClosedError(InferccError):
    """A closed session (or a sequence of one, or a closed sequence) was used."""


#: How a session gets closed without the user calling close(): said in every closed-session error.
CLOSED_HOW = ("`with compiled.session() as s:` closes it at the end of the block (as session.close() does): "
              "use its sequences inside the block")


class Session:
    def __init__(self, compiled: CompiledModel, *, max_context: int | None = None) -> None:
        self.compiled = compiled
        self.runner = ModelRunner(compiled.backend, compiled.model, max_context)
        self._sequences: weakref.WeakSet[Sequence] = weakref.WeakSet()
        self._lock = threading.Lock()
        self.closed = False

    @property
    def tokenizer(self) -> Tokenizer:
        return self.compiled.tokenizer

    @property
    def max_context(self) -> int | None:
        return self.runner.max_context

    @property
    def cached(self) -> bool:
        """Whether the model keeps a KV cache (else each step recomputes the whole sequence)."""
        return self.runner.cached

    def sequence(self, params: SamplingParams | None = None, **sampling) -> Sequence:
        """A new, empty sequence; ``params`` or keyword sampling options choose how ``decode``
        picks tokens (default greedy)."""
        params = (params or SamplingParams()).replace(**sampling) if sampling else (params or SamplingParams())
        with self._lock:
            self._check_open()
            seq = Sequence(self, params)
            self._sequences.add(seq)
        return seq

    @property
    def bytes_per_token(self) -> int:
        """KV-cache bytes one token of one sequence takes (0 when the model has no cache)."""
        return self.runner.cache_spec.bytes_per_token if self.runner.cache_spec else 0

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the caches of the open sequences."""
        with self._lock:
            return sum(s.memory_bytes for s in list(self._sequences))

    def close(self) -> None:
        """Free every sequence's cache; using the session or its sequences afterwards is an error."""
        with self._lock:
            self.closed = True
            sequences = list(self._sequences)
        for seq in sequences:
            seq.close()

    def _check_open(self) -> None:
        if self.closed:
            raise SessionClosedError(f"this session is closed: {CLOSED_HOW}, or make a new one with compiled.session()")

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._sequences)} sequences"
        return f"<Session {'cached' if self.cached else 'uncached'}, {state}>"


class Sequence:
    """One text being read and extended. ``prefill`` the prompt, then ``decode`` token by token
    (or ``append`` more context); ``logits`` are those of the last position fed."""

    def __init__(self, session: Session, params: SamplingParams) -> None:
        self.session = session
        self.params = params
        self.sampler = Sampler(params)
        self._lock = threading.Lock()
        self._cache = session.runner.new_cache(1)
        self.context: list[int] = []  # ids fed by prefill/append
        self.output: list[int] = []  # ids chosen by decode
        self.logits: np.ndarray | None = None
        self.closed = False

    # -- feeding ------------------------------------------------------------------------------
    def prefill(self, tokens: Tokens, all_logits: bool = False) -> np.ndarray:
        """Feed the prompt (ids or text; text gets the tokenizer's BOS). Returns the last
        position's logits [vocab], or every fed position's [n, vocab] when ``all_logits``
        (perplexity)."""
        with self._lock:
            self._check_open("prefill")
            if self.length:
                raise InputError("prefill() starts a sequence but this one already has tokens; "
                                 "use append() to add more, or reset() first")
            return self._feed(self._encode(tokens, first=True), False, all_logits)

    def append(self, tokens: Tokens, all_logits: bool = False) -> np.ndarray:
        """Feed more tokens (ids or text) after what the sequence holds; returns logits as
        ``prefill`` does."""
        with self._lock:
            self._check_open("append")
            return self._feed(self._encode(tokens, first=self._cache.length == 0), False, all_logits)

    def decode(self) -> int:
        """Choose the next token from the last logits with this sequence's sampler, feed it, and
        return it (``logits`` then predict the token after it)."""
        with self._lock:
            self._check_open("decode")
            if self.logits is None:
                raise InputError("decode() needs logits: prefill() the sequence with a prompt first")
            token = self.sampler(self.logits, self.context, self.output)
            self._feed([token], True)
            return token

    def _feed(self, ids: list[int], generated: bool, all_logits: bool = False) -> np.ndarray:
        if not ids:
            raise InputError("no tokens to feed (an empty prompt); pass at least one token id or some text")
        logits = self.session.runner.step(self._cache, [ids], all_logits)[0]
        self.logits = logits[-1] if all_logits else logits
        (self.output if generated else self.context).extend(ids)
        return logits

    def _encode(self, tokens: Tokens, first: bool) -> list[int]:
        if isinstance(tokens, str):
            return self.session.tokenizer.encode(tokens, add_bos=None if first else False)
        if isinstance(tokens, (int, np.integer)):
            return [int(tokens)]
        return [int(t) for t in np.asarray(tokens).reshape(-1)]

    # -- state --------------------------------------------------------------------------------
    @property
    def tokens(self) -> list[int]:
        """Every id fed so far, in order."""
        return self._cache.tokens()

    @property
    def length(self) -> int:
        return len(self.context) + len(self.output)

    def __len__(self) -> int:
        return self.length

    @property
    def text(self) -> str:
        """The decoded text of every token fed so far."""
        return self.session.tokenizer.decode(self.tokens)

    @property
    def memory_bytes(self) -> int:
        return self._cache.nbytes

    @property
    def bytes_per_token(self) -> int:
        """KV-cache bytes one more token costs (0 when the model has no cache)."""
        return self._cache.bytes_per_token

    def reset(self) -> None:
        """Forget everything: the cache is freed, the sampler starts again from its seed."""
        with self._lock:
            self._check_open("reset")
            self._clear()

    def close(self) -> None:
        """Free the cache; the sequence cannot be used again (closing twice is harmless)."""
        with self._lock:
            self._clear()
            self.closed = True

    def _clear(self) -> None:
        self._cache.free()
        self.context, self.output, self.logits = [], [], None
        self.sampler = Sampler(self.params)

    def _check_open(self, action: str) -> None:
        """Refuse ``action`` on a closed sequence, naming which was closed: the session (the usual
        cause: the sequence outlived a ``with`` block) or this sequence itself."""
        if self.session.closed:
            raise SessionClosedError(f"cannot {action}(): this sequence's session is closed: {CLOSED_HOW}, "
                                     "or make a new session with compiled.session()")
        if self.closed:
            raise SessionClosedError(f"cannot {action}(): this sequence was closed with sequence.close(); make a "
                                     "new one with session.sequence()")

    def __repr__(self) -> str:
        return f"<Sequence {self.length} tokens{' closed' if self.closed else ''}>"
