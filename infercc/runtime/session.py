"""Sessions and sequences: stateful, step-by-step use of a compiled model.

A ``Session`` (``compiled.session()``) owns the model runner and every ``Sequence`` made from it;
``session.close()`` frees all their caches. A ``Sequence`` is one independent text: its token
history, sampler (params + seeded generator) and lock; the lock makes a single sequence safe to
share between threads, one step at a time.

Where a sequence's keys and values live:

* Paged (``Config.kv_cache_layout == "paged"``, the default, on a graph with a KV cache): the
  session owns one block pool (runtime/session_pool.py), sized from ``Config.kv_cache_memory`` as
  the engine's (``compiled.session(kv_cache_memory=...)`` overrides it), and each sequence is a
  sequence id in it. Sequences whose prompts start alike share the computed full blocks (prefix
  caching: the second computes only the rest); ``fork()`` shares every block copy-on-write; the
  steps of several sequences run together -- ``session.decode([...])`` advances many sequences in
  one model step, and concurrent ``seq.decode()`` calls from several threads are batched the same
  way. Every sequence's tokens are the ones it gives alone.
* Contiguous (``kv_cache_layout="contiguous"``): each sequence its own growing cache
  (runtime/kv_cache.py), as before the pool: the layout asked for when the block indirection is
  not wanted (e.g. comparing against it). A graph without a KV cache has nothing to page: each
  step recomputes the sequence's whole history, so sequences keep their own token lists. In both,
  several threads may drive several sequences at once (ONNX Runtime's ``run`` is thread-safe), one
  model call each.

Speculative decoding (``speculation=`` on ``compiled.session``, ``session.sequence`` or ``fork``;
default ``Config.speculation``): a stream of ``decode()`` calls costs fewer model steps, each call
still returning the one token plain decoding gives (runtime/session_speculation.py).

Sequences step in Python on every runtime: a sequence hands out its logits and keeps its cache after
each ``prefill``/``append``/``decode``, which the generated-C decode loop (runtime/c_generate.py,
used by ``generate``/``stream``) keeps inside the library; each step is still one C forward run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
import weakref
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InferccError, InputError
from . import session_speculation
from .kv_cache import check_context
from .model_runner import ModelRunner
from .sampling import Sampler, SamplingParams
from .session_pool import Feed, SessionPool, check_pool_memory
from .spec_engine import check_method, request_config
from .speculative.policy import SpeculationStats

if TYPE_CHECKING:
    from ..compiled import CompiledModel
    from ..config import Config
    from .tokenizer import Tokenizer

Tokens = str | Seq[int] | np.ndarray


class SessionClosedError(InferccError):
    """A closed session (or a sequence of one, or a closed sequence) was used."""


#: A forked child's default seed: the parent's seed + FORK_SEED_OFFSET * k for its k-th fork (k = 1,
#: 2, ...), so n samples forked from one prompt with one seed draw n different, reproducible texts.
FORK_SEED_OFFSET = 1

#: How a session gets closed without the user calling close(): said in every closed-session error.
CLOSED_HOW = ("`with compiled.session() as s:` closes it at the end of the block (as session.close() does): "
              "use its sequences inside the block")


class Session:
    def __init__(self, compiled: CompiledModel, *, max_context: int | None = None,
                 kv_cache_memory: int | None = None, speculation: str | None = None) -> None:
        """``max_context`` overrides the model's context length; ``kv_cache_memory`` the pool's bytes
        (default ``Config.kv_cache_memory``; paged layout only); ``speculation`` its sequences'
        default method (a ``Config.speculation`` value or "off"; None: the model's config)."""
        self.compiled = compiled
        check_method(compiled.config, speculation, "compiled.session")
        #: The sequences' speculation method when they name none (None: ``Config.speculation``).
        self.default_speculation = speculation
        #: The model runner over per-sequence caches: the contiguous layout's and uncached graphs'
        #: steps, and the model's interface (context, vocabulary) for the pool.
        self.runner = ModelRunner(compiled.backend, compiled.model, max_context)
        #: Whether the sequences live in one paged pool (made at the first feed: a session that only
        #: asks ``cached`` or steps ``runner`` itself never lowers or allocates it).
        self.paged = self.runner.cached and compiled.config.kv_cache_layout == "paged"
        self._pool: SessionPool | None = None
        self._kv_cache_memory = kv_cache_memory
        if kv_cache_memory is not None:
            check_pool_memory(kv_cache_memory)
        self._ids = itertools.count()
        self._dead: list[int] = []  # sequences garbage-collected unclosed: their blocks go at the next booking
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

    @property
    def layout(self) -> str:
        """Where the sequences' K/V live: "paged" (one pool), "contiguous" (one cache each) or
        "uncached" (no K/V: recomputed every step)."""
        return "paged" if self.paged else "contiguous" if self.cached else "uncached"

    @property
    def pool(self) -> SessionPool | None:
        """The sequences' paged pool (made now if not yet); None unless ``layout == "paged"``."""
        if self.paged and self._pool is None:
            with self._lock:
                self._check_open()
                if self._pool is None:
                    self._pool = SessionPool(self.compiled, self.runner, self._kv_cache_memory, self._dead)
        return self._pool

    def sequence(self, params: SamplingParams | None = None, *, adapter=None, adapter_weights=None,
                 speculation: str | None = None, speculation_policy: str | None = None,
                 max_speculation_compute_fraction: float | None = None, **sampling) -> Sequence:
        """A new, empty sequence; ``params`` or keyword sampling options choose how ``decode``
        picks tokens (default greedy). ``adapter``: a loaded LoRA adapter's name (or a list of
        names with ``adapter_weights``: a composition) the sequence runs with; see ``set_adapter``.
        ``speculation``: a ``Config.speculation`` method, "off", or None for the session's default:
        ``decode()`` still returns one token per call, the one plain decoding gives, from fewer
        model steps (``seq.speculation`` counts them; a method that cannot run decodes plainly,
        ``seq.speculation_reason`` says why); ``speculation_policy`` and
        ``max_speculation_compute_fraction``: its own (None: the config's)."""
        method = check_method(self.compiled.config, self.default_speculation if speculation is None else speculation,
                              "session.sequence")
        own = request_config(self.compiled.config, "session.sequence", speculation_policy=speculation_policy,
                             max_speculation_compute_fraction=max_speculation_compute_fraction)
        params = _with(params or SamplingParams(), sampling)
        ref = self.compiled.lora.resolve(adapter, adapter_weights) if adapter is not None else None
        return self._new(params, ref, method, own)

    def _new(self, params: SamplingParams, ref, method: str | None, own: Config | None = None) -> Sequence:
        """A sequence holding ``ref`` (already acquired; released when it closes or is dropped)
        speculating with ``method`` (checked; None: off), its own speculation fields ``own``."""
        try:
            spec, reason = session_speculation.start(self, method, own)
            with self._lock:
                self._check_open()
                seq = Sequence(self, params, ref)
                seq._method, seq._spec, seq.speculation_reason = method, spec, reason
                seq._own = own
                if spec is not None:
                    seq._spec_release = weakref.finalize(seq, spec.release)
                self._sequences.add(seq)
        except BaseException:
            if ref is not None:
                self.compiled.lora.release(ref)
            raise
        return seq

    def decode(self, sequences: Iterable[Sequence]) -> list[int]:
        """Advance each sequence by one token (its own sampler), all in ONE model step on the paged
        pool (one step per sequence otherwise); returns the tokens in order. Each sequence gets the
        token its own ``decode()`` would give (a speculating sequence holding verified tokens
        returns one without the step; the others verify their proposals in it). On the pool, an
        error (a closed or unprefilled sequence, the context, a full pool) changes no sequence."""
        seqs = list(sequences)
        for i, seq in enumerate(seqs):
            if not isinstance(seq, Sequence) or seq.session is not self:
                raise InputError(f"session.decode: item {i} is {seq!r}, not a sequence of this session; pass "
                                 "sequences made by this session's sequence()")
        if len({id(s) for s in seqs}) != len(seqs):
            raise InputError("session.decode: a sequence appears twice; each advances by one token per call")
        if not self.paged or not seqs:
            return [seq.decode() for seq in seqs]
        with contextlib.ExitStack() as stack:
            for seq in sorted(seqs, key=id):  # one lock order for every caller: no deadlock
                stack.enter_context(seq._lock)
            return session_speculation.decode(seqs)

    @property
    def bytes_per_token(self) -> int:
        """KV-cache bytes one token of one sequence takes (0 when the model has no cache)."""
        return self.runner.cache_spec.bytes_per_token if self.runner.cache_spec else 0

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the caches of the open sequences (paged: the blocks they hold, a shared
        block once, times the bytes per block)."""
        if self.paged:
            pool = self._pool
            return pool.report().used * pool.bytes_per_block if pool is not None else 0
        with self._lock:
            return sum(s.memory_bytes for s in list(self._sequences))

    def close(self) -> None:
        """Free every sequence's cache; using the session or its sequences afterwards is an error."""
        with self._lock:
            self.closed = True
            sequences = list(self._sequences)
        for seq in sequences:
            seq.close()
        if self._pool is not None:
            self._pool.close()

    def _check_open(self) -> None:
        if self.closed:
            raise SessionClosedError(f"this session is closed: {CLOSED_HOW}, or make a new one with compiled.session()")

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._sequences)} sequences"
        return f"<Session {self.layout}, {state}>"


class Sequence:
    """One text being read and extended. ``prefill`` the prompt, then ``decode`` token by token
    (or ``append`` more context); ``logits`` are those of the last position fed."""

    def __init__(self, session: Session, params: SamplingParams, adapter=None) -> None:
        self.session = session
        self.params = params
        self.sampler = Sampler(params)
        self._lock = threading.Lock()
        self._paged = session.paged
        #: The LoRA adapter it runs with (an ``infercc.lora.AdapterRef``), None for the base model.
        self.adapter = adapter
        self._release_adapter = weakref.finalize(self, session.compiled.lora.release, adapter) if adapter else None
        self._runner = session.runner if adapter is None or self._paged else _adapter_runner(session, adapter)
        if self._paged:
            self._id = next(session._ids)
            self._history: list[int] = []  # every id fed, in order (the pool keeps no token lists for us)
            # A sequence dropped without close() gives its blocks back at the pool's next booking
            # (a finalizer may run in any thread, even one inside the pool: it only appends).
            self._finalizer = weakref.finalize(self, session._dead.append, self._id)
        else:
            self._cache = self._runner.new_cache(1)
        self._forks = 0
        self.context: list[int] = []  # ids fed by prefill/append
        self.output: list[int] = []  # ids chosen by decode
        self.logits: np.ndarray | None = None
        self.closed = False
        #: Speculation (session_speculation.py; set by Session._new): the method asked for, its state
        #: (None: plain decoding) and why a method asked for does not run here.
        self._method: str | None = None
        self._own: Config | None = None  # its own speculation_policy, ... (spec_engine.request_config)
        self._spec: session_speculation.SequenceSpeculation | None = None
        self._spec_release: weakref.finalize | None = None
        self.speculation_reason: str | None = None

    # -- feeding ------------------------------------------------------------------------------
    def prefill(self, tokens: Tokens, all_logits: bool = False) -> np.ndarray:
        """Feed the prompt (ids or text; text gets the tokenizer's BOS). Returns the last
        position's logits [vocab], or every fed position's [n, vocab] when ``all_logits``
        (perplexity). On the paged pool, full blocks another sequence already computed for the
        same leading tokens are reused (not computed again) unless ``all_logits``."""
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
            self._drop_pending()
            return self._feed(self._encode(tokens, first=self.length == 0), False, all_logits)

    def decode(self) -> int:
        """Choose the next token from the last logits with this sequence's sampler, feed it, and
        return it (``logits`` then predict the token after it). On the paged pool, decodes of
        other sequences running at the same time (other threads) share the model step. A
        speculating sequence returns verified tokens kept from an earlier step without one."""
        with self._lock:
            return session_speculation.decode([self])[0]

    def _check_decode(self) -> None:
        if self.logits is None:
            raise InputError("decode() needs logits: prefill() the sequence with a prompt first")
        check_context(self.length + 1, self.session.max_context)

    def _feed(self, ids: list[int], generated: bool, all_logits: bool = False) -> np.ndarray:
        if not ids:
            raise InputError("no tokens to feed (an empty prompt); pass at least one token id or some text")
        if self._paged:
            pool = self.session.pool
            assert pool is not None
            logits = pool.feed([Feed(self._id, self.length, ids, all_logits, self.adapter)])[0]
            self._history.extend(ids)
        else:
            logits = self._runner.step(self._cache, [ids], all_logits)[0]
        self.logits = logits[-1] if all_logits else logits
        (self.output if generated else self.context).extend(ids)
        return logits

    def _encode(self, tokens: Tokens, first: bool) -> list[int]:
        if isinstance(tokens, str):
            return self.session.tokenizer.encode(tokens, add_bos=None if first else False)
        if isinstance(tokens, (int, np.integer)):
            return [int(tokens)]
        return [int(t) for t in np.asarray(tokens).reshape(-1)]

    # -- forking ------------------------------------------------------------------------------
    def fork(self, params: SamplingParams | None = None, *, speculation: str | None = None, **sampling) -> Sequence:
        """A new sequence of the same session holding everything this one holds (tokens, logits),
        continuing on its own. On the paged pool it shares every block copy-on-write (nothing is
        copied until one of them writes into a shared, partly filled block); otherwise its cache
        is computed again from the tokens. Its sampler: ``params`` / keyword options when given
        (over this sequence's params), else this sequence's params with the seed moved by
        ``FORK_SEED_OFFSET`` per fork (the k-th fork gets seed + k; no seed stays no seed).
        ``speculation``: the child's method (default: this sequence's); the child holds the
        returned tokens only, this sequence keeps its verified ones."""
        with self._lock:
            self._check_open("fork")
            self._forks += 1
            if params is None and not sampling:
                seed = self.params.seed
                params = self.params.replace(seed=None if seed is None else seed + FORK_SEED_OFFSET * self._forks)
            params = _with(params or self.params, sampling)
            method = self._method if speculation is None else check_method(
                self.session.compiled.config, speculation, "sequence.fork")
            child = self.session._new(params, self.session.compiled.lora.acquire(self.adapter) if self.adapter else None,
                                      method, self._own)
            if self.length:
                if self._paged:
                    self.session.pool.fork(self._id, child._id)  # type: ignore[union-attr]
                    if len(self._history) > self.length:  # this sequence's verified, unreturned tokens
                        child._keep(self.length)
                    child._history = self.tokens
                else:
                    child._runner.step(child._cache, [self.tokens])
                child.context, child.output = list(self.context), list(self.output)
                child.logits = None if self.logits is None else self.logits.copy()
            return child

    # -- state --------------------------------------------------------------------------------
    @property
    def tokens(self) -> list[int]:
        """Every id fed or returned so far, in order (not the verified tokens a speculating
        sequence holds for its next calls)."""
        return self._history[:self.length] if self._paged else self._cache.tokens()[:self.length]

    @property
    def speculation(self) -> SpeculationStats | None:
        """Proposed and accepted tokens and verify steps so far (a copy); None when the sequence
        decodes plainly (``speculation_reason`` says why when a method was asked for)."""
        return dataclasses.replace(self._spec.stats) if self._spec is not None else None

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
        """Bytes of the cache this sequence holds (paged: its blocks, shared ones included)."""
        if self._paged:
            pool = self.session._pool
            return pool.blocks_held(self._id) * pool.bytes_per_block if pool is not None else 0
        return self._cache.nbytes

    @property
    def bytes_per_token(self) -> int:
        """KV-cache bytes one more token costs (0 when the model has no cache)."""
        return self.session.bytes_per_token if self._paged else self._cache.bytes_per_token

    def reset(self) -> None:
        """Forget everything: the cache is freed, the sampler starts again from its seed."""
        with self._lock:
            self._check_open("reset")
            self._clear()

    def close(self) -> None:
        """Free the cache; the sequence cannot be used again (closing twice is harmless)."""
        with self._lock:
            if not self.closed:
                self._clear()
            self.closed = True
            if self._paged:
                self._finalizer.detach()
            if self._release_adapter is not None:
                self._release_adapter()
            if self._spec_release is not None:
                self._spec_release()

    def _drop_cache(self) -> None:
        """Give back the sequence's keys and values: its pool blocks, or its contiguous cache."""
        if self._paged:
            if self.session._pool is not None:
                self.session._pool.release(self._id)
            self._history = []
        else:
            self._cache.free()

    def _drop_pending(self) -> None:
        """A speculating sequence forgets its verified, unreturned tokens (their slots go back)."""
        if self._spec is not None:
            self._spec.drop(self)

    def _keep(self, length: int) -> None:
        """The cache keeps its first ``length`` tokens (the rest: speculated tokens not returned)."""
        if self._paged:
            self.session.pool.keep(self._id, length)  # type: ignore[union-attr]
            del self._history[length:]
        else:
            self._cache.truncate(length)

    def _clear(self) -> None:
        if self._spec is not None:
            self._spec.pending.clear()
            self._spec.next = None
        self._drop_cache()
        self.context, self.output, self.logits = [], [], None
        self.sampler = Sampler(self.params)

    def set_adapter(self, adapter, adapter_weights=None) -> None:
        """Run from now on with another LoRA adapter (a name, a list with ``adapter_weights``, or
        None for the base model). A sequence's cached keys and values belong to the adapter they were
        computed with, so its whole prefix is computed again under the new one (one prefill of every
        token it holds; ``logits`` are then the new adapter's). Tokens and sampler are kept."""
        with self._lock:
            self._check_open("set_adapter")
            self._drop_pending()
            registry = self.session.compiled.lora
            ref = registry.resolve(adapter, adapter_weights) if adapter is not None else None
            tokens, context, output = self.tokens, list(self.context), list(self.output)
            old, old_release = self.adapter, self._release_adapter
            try:
                self._switch(ref)
                if tokens:
                    self.context, self.output = [], []
                    self._feed(tokens, False)
            except BaseException:
                if ref is not None:
                    registry.release(ref)
                self._release_adapter = None
                self._switch(old)  # back to the old adapter (its prefix recomputed too)
                self._release_adapter = old_release
                if tokens:
                    self.context, self.output = [], []
                    self._feed(tokens, False)
                self.context, self.output = context, output
                raise
            self.context, self.output = context, output
            if old_release is not None:
                old_release()
            self._release_adapter = weakref.finalize(self, registry.release, ref) if ref is not None else None

    def _switch(self, ref) -> None:
        """Drop the cache and point the sequence at ``ref``'s runner (not its release handle)."""
        self._drop_cache()
        if not self._paged:
            self._runner = self.session.runner if ref is None else _adapter_runner(self.session, ref)
            self._cache = self._runner.new_cache(1)
        self.adapter = ref

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


def _adapter_runner(session: Session, ref) -> ModelRunner:
    """A model runner of the LoRA graph variant with ``ref``'s deltas (contiguous and uncached layouts)."""
    compiled = session.compiled
    return ModelRunner(compiled.lora.view(ref), compiled.model, session.max_context)


def _with(params: SamplingParams, sampling: dict) -> SamplingParams:
    """``params`` with the keyword sampling options laid over it."""
    return params.replace(**sampling) if sampling else params
