"""The adapters loaded into one compiled model, their columns in the stacked factors, and the LoRA
graph variant that runs rows with adapters (passes/lora/).

* ``add`` reads and checks an adapter completely (every module must name a projection of the
  model with matching sizes, rank <= ``Config.max_lora_rank``) before anything changes: an adapter
  is loaded whole or not at all.
* ``resolve`` turns a request's selection (a name, or names + weights for a composition) into an
  ``AdapterRef``: what the runners carry per row. Its ``identity`` is unique to the adapter's
  contents as loaded (a re-added name gets a new one), which prefix-cache keys include, so K/V
  computed under one adapter are never served to another.
* Runners call ``view(refs)`` for a backend-like object whose ``run_bound`` / ``run`` feed the
  variant with each row's adapter mask and the current factors.

The stacked factors are rebuilt (copy on write) whenever the set of adapters changes, under the lock; a
step takes the current snapshot once, so an ``add`` during a step never tears it. An adapter held
by a running request or an open sequence cannot be removed (``remove`` says which to close).

Thread-safe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
import threading
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from ..passes.lora import Site, a_input, b_input, find_sites, insert_lora, mask_input
from .compose import compose
from .merged import MergedCache
from .peft import AdapterError, LoraAdapter, LoraModule, read_adapter

if TYPE_CHECKING:
    from ..compiled import CompiledModel
    from ..ir import Model

#: A valid adapter name: an identifier-like word (it reaches metrics, URLs and error messages).
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise AdapterError(f"adapter name {name!r} is not valid: use 1-64 letters, digits, '_' or '-', starting "
                           "with a letter (e.g. 'sql_v2')")
    return name


@dataclasses.dataclass(frozen=True)
class AdapterRef:
    """A selection, resolved: ``key`` finds its columns; ``identity`` keys its cached K/V."""

    key: tuple
    identity: bytes
    names: tuple[str, ...]

    @property
    def label(self) -> str:
        return "+".join(self.names)


@dataclasses.dataclass
class _Entry:
    ref: AdapterRef
    #: site index -> (A [in, r], B [r, out]) with the scaling folded into B
    factors: dict[int, tuple[np.ndarray, np.ndarray]]
    source: LoraAdapter | None = None  # the file's adapter (None for a composition)
    users: int = 0


@dataclasses.dataclass(frozen=True)
class _State:
    """One snapshot of the stacked factors: ``feeds`` (A and B per site), and for the masks, per
    column layout (sites targeted by the same adapters at the same ranks share one) where each
    adapter's columns are, and which layout each site has."""

    sites: tuple[int, ...]
    feeds: dict[str, np.ndarray]
    layouts: tuple[tuple[dict[tuple, tuple[int, int]], int], ...] = ()
    layout_of: dict[int, int] = dataclasses.field(default_factory=dict)
    keys: frozenset = frozenset()


class AdapterRegistry:
    def __init__(self, compiled: CompiledModel) -> None:
        self.compiled = compiled
        self.config = compiled.config
        self._lock = threading.RLock()
        self._adapters: dict[str, _Entry] = {}
        self._virtual: dict[tuple, _Entry] = {}
        self._counter = itertools.count(1)
        self._state = _State((), {})
        self._backends: dict[tuple[int, ...], Any] = {}
        self._base: Model | None = None
        self._sites: list[Site] | None = None
        self._by_weight: dict[str, Site] = {}
        #: Why adapter rows run where they run (set when the first variant is built).
        self.reason: str | None = None
        self.on_c = False
        self.merged = MergedCache(self, self.config.lora_merged_cache_bytes)

    # -- the model's projections -----------------------------------------------------------------
    def _prepare(self) -> None:
        """The graph the variant is made from (the model's own: ONNX Runtime's, or the generated-C
        runtime's canonical graph), and its projections (once)."""
        if self._sites is not None:
            return
        from ..runtime.c_backend import CBackend

        backend = self.compiled.backend
        self.on_c = isinstance(backend, CBackend)
        if self.on_c:
            self._base = self.compiled.model
            self.reason = ("adapter rows run the LoRA graph variant on the generated-C runtime (grouped low-rank "
                           "deltas as MatMul/Mul kernels; the paged pool gathered per step)")
        else:
            self._base = backend.model
            self.reason = "adapter rows run the LoRA graph variant on ONNX Runtime (grouped low-rank deltas)"
        self.compiled.diagnostics.facts["lora"] = self.reason
        self._sites = find_sites(self._base)
        self._by_weight = {name: site for site in self._sites for name, _ in site.sources}

    @property
    def modules(self) -> list[str]:
        """The module names adapters may target (checkpoint weight names without ``.weight``)."""
        self._prepare()
        return sorted(name.removesuffix(".weight") for name in self._by_weight)

    # -- loading ---------------------------------------------------------------------------------
    def add(self, name: str, path: Any) -> None:
        check_name(name)
        with self._lock:
            if name in self._adapters:
                raise AdapterError(f"an adapter named {name!r} is already loaded; remove_adapter({name!r}) first or "
                                   "choose another name")
        adapter = read_adapter(path)
        self._check_rank(adapter.rank, f"{adapter.path}: r={adapter.rank}")
        factors = self._factors(adapter.modules, adapter.scaling, adapter.path)
        with self._lock:
            if name in self._adapters:
                raise AdapterError(f"an adapter named {name!r} was loaded meanwhile; remove it first")
            identity = hashlib.sha256(f"lora:{name}:{next(self._counter)}".encode()).digest()
            self._adapters[name] = _Entry(AdapterRef((name,), identity, (name,)), factors, adapter)
            self._rebuild()

    def _check_rank(self, rank: int, where: str) -> None:
        if rank > self.config.max_lora_rank:
            raise AdapterError(f"{where} is above Config.max_lora_rank={self.config.max_lora_rank}; raise "
                               "max_lora_rank (every adapter row pays for the largest rank loaded)")

    def _factors(self, modules: dict[str, LoraModule], scaling: float, where: str) -> dict[int, tuple]:
        """Per site the packed factors; AdapterError naming the first module that does not fit."""
        self._prepare()
        pieces: dict[int, list[tuple[str, LoraModule]]] = {}
        for module, factor in modules.items():
            weight = self._weight_of(module)
            site = self._by_weight.get(weight) if weight else None
            if site is None:
                known = self.modules
                raise AdapterError(f"{where}: target module {module!r} is not a projection of this model; its "
                                   f"projections are {known[:6]}{' ...' if len(known) > 6 else ''} "
                                   "(was the adapter trained for another base model?)")
            begin, end = site.columns(weight)
            if factor.a.shape[1] != site.in_features or factor.b.shape[0] != end - begin:
                raise AdapterError(f"{where}: module {module!r} has lora_A {list(factor.a.shape)} and lora_B "
                                   f"{list(factor.b.shape)}, but the model's projection maps {site.in_features} -> "
                                   f"{end - begin} features (expected [r, {site.in_features}] and [{end - begin}, r]); "
                                   "the adapter was trained for another base model")
            pieces.setdefault(site.index, []).append((weight, factor))
        out = {}
        for index, parts in pieces.items():
            site = self._sites[index]  # type: ignore[index]
            a = np.concatenate([f.a.T for _, f in parts], axis=1)
            b = np.zeros((a.shape[1], site.out_features), np.float32)
            row = 0
            for weight, f in parts:
                begin, end = site.columns(weight)
                b[row:row + f.rank, begin:end] = f.b.T * np.float32(scaling)
                row += f.rank
            out[index] = (np.ascontiguousarray(a, np.float32), b)
        return out

    def _weight_of(self, module: str) -> str | None:
        """The site weight of PEFT module ``module``: ``<module>.weight`` itself, or the one weight
        that ends with it (an export wrapper adds leading scopes: ``model.<module>.weight``)."""
        exact = module + ".weight"
        if exact in self._by_weight:
            return exact
        found = [w for w in self._by_weight if w.endswith("." + exact)]
        return found[0] if len(found) == 1 else None

    def remove(self, name: str) -> None:
        with self._lock:
            entry = self._adapters.get(name)
            if entry is None:
                raise AdapterError(f"no adapter named {name!r} is loaded (loaded: {sorted(self._adapters)})")
            users = [e for e in (entry, *self._virtual.values()) if name in e.ref.names and e.users]
            if users:
                raise AdapterError(f"adapter {name!r} is in use by {sum(e.users for e in users)} running request(s) "
                                   "or open sequence(s); close them (or let them finish) before removing it")
            del self._adapters[name]
            self._virtual = {k: v for k, v in self._virtual.items() if name not in v.ref.names}
            self._rebuild()
        self.merged.drop({name})

    @property
    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._adapters)

    def info(self, name: str) -> dict[str, Any]:
        with self._lock:
            entry = self._adapters[name]
            src = entry.source
            assert src is not None
            return {"name": name, "path": src.path, "rank": src.rank, "alpha": src.alpha, "scaling": src.scaling,
                    "modules": sorted(src.modules)}

    # -- selection -------------------------------------------------------------------------------
    def resolve(self, adapter: Any, weights: Sequence[float] | None = None) -> AdapterRef | None:
        """The ref of ``adapter`` (None, a name, or a list of names with ``weights``), held until
        ``release``; InputError for an unknown name or a bad composition."""
        if adapter is None:
            if weights is not None:
                raise InputError("adapter_weights were given without adapter=[...]; name the adapters they weigh")
            return None
        names = [adapter] if isinstance(adapter, str) else list(adapter) if isinstance(adapter, (list, tuple)) else None
        if not names or not all(isinstance(n, str) for n in names):
            raise InputError(f"adapter must be an adapter name or a non-empty list of names, got {adapter!r}")
        if weights is None:
            weights = [1.0] * len(names)
        weights = list(weights) if isinstance(weights, (list, tuple)) else None  # type: ignore[assignment]
        if weights is None or len(weights) != len(names) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and np.isfinite(w) for w in weights):
            raise InputError(f"adapter_weights must be a list of {len(names)} finite numbers (one per adapter), "
                             f"got {weights!r}")
        if len(set(names)) != len(names):
            raise InputError(f"adapter lists {names} name an adapter twice; give each once with its weight")
        with self._lock:
            missing = [n for n in names if n not in self._adapters]
            if missing:
                raise InputError(f"no adapter named {missing[0]!r} is loaded (loaded: {sorted(self._adapters)}); "
                                 "load it with compiled.add_adapter(name, path)")
            if len(names) == 1 and weights[0] == 1.0:
                entry = self._adapters[names[0]]
            else:
                entry = self._composition(names, [float(w) for w in weights])
            entry.users += 1
            return entry.ref

    def _composition(self, names: list[str], weights: list[float]) -> _Entry:
        mode = self.config.lora_composition
        key = (mode, tuple(names), tuple(weights))
        entry = self._virtual.get(key)
        if entry is None:
            parts = [self._adapters[n] for n in names]
            modules = compose([p.source for p in parts], names, weights, mode, self.config.max_lora_rank)  # type: ignore[misc]
            factors = self._factors(modules, 1.0, f"composition {names}")
            identity = hashlib.sha256(b"".join(p.ref.identity for p in parts) + repr(key).encode()).digest()
            entry = _Entry(AdapterRef(key, identity, tuple(names)), factors)
            self._virtual[key] = entry
            self._rebuild()
        return entry

    def _entry(self, ref: AdapterRef) -> _Entry | None:
        entry = self._adapters.get(ref.key[0]) if len(ref.key) == 1 else self._virtual.get(ref.key)
        return entry if entry is not None and entry.ref is ref else None

    def acquire(self, ref: AdapterRef) -> AdapterRef:
        """Hold ``ref`` once more (a forked sequence); InputError when it was removed meanwhile."""
        with self._lock:
            entry = self._entry(ref)
            if entry is None:
                raise InputError(f"adapter {ref.label!r} is no longer loaded")
            entry.users += 1
            return ref

    def release(self, ref: AdapterRef | None) -> None:
        if ref is None:
            return
        with self._lock:
            entry = self._entry(ref)
            if entry is not None and entry.users > 0:
                entry.users -= 1

    # -- running ---------------------------------------------------------------------------------
    def _rebuild(self) -> None:
        """New factors for the current adapters (under the lock): per site, every adapter that
        targets it on its own columns."""
        entries = [*self._adapters.values(), *self._virtual.values()]
        feeds: dict[str, np.ndarray] = {}
        layouts: dict[tuple, int] = {}
        layout_of: dict[int, int] = {}
        for index in sorted({i for entry in entries for i in entry.factors}):
            users = [entry for entry in entries if index in entry.factors]
            feeds[a_input(index)] = np.concatenate([e.factors[index][0] for e in users], axis=1)
            feeds[b_input(index)] = np.concatenate([e.factors[index][1] for e in users], axis=0)
            key = tuple((e.ref.key, e.factors[index][0].shape[1]) for e in users)
            layout_of[index] = layouts.setdefault(key, len(layouts))
        spans = []
        for key in layouts:  # (insertion order = layout ids)
            at, span = 0, {}
            for ref_key, width in key:
                span[ref_key] = (at, at + width)
                at += width
            spans.append((span, at))
        self._state = _State(tuple(sorted(layout_of)), feeds, tuple(spans), layout_of,
                             frozenset(e.ref.key for e in entries))

    def _backend(self, sites: tuple[int, ...], paged: int | None = None):
        """The variant adapting ``sites``; ``paged``: its paged-attention form for KV blocks of that
        many tokens (generated C only; None when the lowering or the build refuses it)."""
        with self._lock:
            key = (sites, paged)
            if key not in self._backends:
                variant = insert_lora(self._base, [self._sites[i] for i in sites])  # type: ignore[arg-type,index]
                backend = self._paged(variant, paged) if paged else self._session(variant)
                # one module set at a time: a new one replaces the variants of the old
                self._backends = {k: v for k, v in self._backends.items() if k[0] == sites}
                self._backends[key] = backend
            return self._backends[key]

    def _paged(self, variant: Model, block_size: int):
        """The variant lowered to PagedAttention and built by the generated-C runtime, or None."""
        from ..passes.cleanup.dce import DeadCodeElimination
        from ..passes.diagnostics import APPLIED
        from ..passes.kv_cache.paged import PagedCacheLowering
        from ..passes.manager import PassManager
        from ..runtime.c_backend import CBackend, CUnavailable

        manager = PassManager([PagedCacheLowering(block_size), DeadCodeElimination()], self.config.replace(strict=False))
        paged, diagnostics = manager.run(variant)
        if diagnostics[PagedCacheLowering.name].status != APPLIED:
            return None
        try:
            return CBackend(paged, intra_op_threads=self.config.intra_op_threads, kernels=self.compiled.kernels)
        except CUnavailable:
            return None

    def _session(self, model: Model):
        """A backend for a variant (or merged copy) of the base graph: on the model's runtime, or
        ONNX Runtime when the generated-C runtime cannot build it (a warning says why)."""
        from ..passes.lowering import lower_for_ort
        from ..runtime.c_backend import CBackend, CUnavailable
        from ..runtime.ort_backend import OrtBackend

        config = self.config
        if self.on_c:
            try:
                return CBackend(model, intra_op_threads=config.intra_op_threads, kernels=self.compiled.kernels)
            except CUnavailable as exc:
                self.reason = f"adapter rows run on ONNX Runtime: the generated-C runtime cannot run the LoRA graph ({exc})"
                self.compiled.diagnostics.facts["lora"] = self.reason
                warnings.warn(f"LoRA adapters: {self.reason}", stacklevel=5)
                model = lower_for_ort(model, config)
        return OrtBackend(model, self.compiled._providers, intra_op_threads=config.intra_op_threads,
                          inter_op_threads=config.inter_op_threads)

    def stats(self) -> dict[str, Any]:
        """Loaded adapters and the merged-weight cache's counts (hits, misses, builds, evictions)."""
        return {"adapters": self.names, "merged_cache": self.merged.stats(), "runs_on": self.reason}

    def view(self, refs: Sequence[AdapterRef | None] | AdapterRef, paged: int | None = None) -> LoraView:
        return LoraView(self, refs, paged)


class LoraView:
    """A backend-like object (``run_bound``, ``run``) that runs the LoRA variant with each row's
    adapter: ``refs`` per row, or one ref for every row."""

    def __init__(self, registry: AdapterRegistry, refs: Sequence[AdapterRef | None] | AdapterRef,
                 paged: int | None = None) -> None:
        """``paged``: the KV block size of a paged-attention variant (generated C; see
        ``paged_backend``), None for the contiguous cached graph."""
        self.registry = registry
        self.refs = refs
        self.paged = paged

    def paged_backend(self) -> Any | None:
        """The paged variant for the current adapters, or None when there is none (then the rows
        run the contiguous variant on gathered blocks)."""
        with self.registry._lock:
            state = self.registry._state
        return self.registry._backend(state.sites, self.paged) if self.paged and self.registry.on_c else None

    def _feeds(self, feeds: dict[str, np.ndarray]) -> tuple[Any, dict[str, np.ndarray]]:
        registry = self.registry
        with registry._lock:
            state = registry._state
        batch = int(feeds["input_ids"].shape[0])
        refs = [self.refs] * batch if isinstance(self.refs, AdapterRef) else list(self.refs)
        if len(refs) != batch:
            raise InputError(f"internal error: {len(refs)} adapter refs for a batch of {batch} rows")
        gone = [r for r in refs if r is not None and r.key not in state.keys]
        if gone:
            raise InputError(f"adapter {gone[0].label!r} was removed while in use")
        if refs[0] is not None and all(r is refs[0] for r in refs):  # one adapter's batch alone: merged copy?
            entry = registry._entry(refs[0])
            merged = registry.merged.backend(entry, self.paged) if entry is not None else None
            if merged is not None:
                return merged, feeds
        masks = []
        for span, width in state.layouts:
            mask = np.zeros((batch, width), np.float32)
            for row, ref in enumerate(refs):
                where = span.get(ref.key) if ref is not None else None
                if where is not None:
                    mask[row, where[0]:where[1]] = 1.0
            masks.append(mask)
        out = {**feeds, **state.feeds}
        for index, layout in state.layout_of.items():
            out[mask_input(index)] = masks[layout]
        return registry._backend(state.sites, self.paged), out

    def run_bound(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray | None]) -> dict[str, np.ndarray]:
        backend, feeds = self._feeds(feeds)
        return backend.run_bound(feeds, outputs)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        backend, feeds = self._feeds(feeds)
        return backend.run(feeds)
