"""Model proposers: a separately compiled draft model with the target's vocabulary, and the
machinery the self-draft (self_draft.py) shares: a draft runs on its own KV cache per sequence.

Each ``propose`` brings the sequence's draft cache to the longest common prefix of what it holds
and the tokens given (KVCache.truncate: rejected proposals disappear), feeds the rest in one step,
then decodes k tokens one step at a time. Greedy requests get the draft's argmax (after the
request's penalties: the most likely guess of the target's choice) as a point mass; sampled ones
draw from the draft's processed distribution q (the request's temperature, top-k/p, min-p), with
a generator seeded from the request's seed, and hand q to verification.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..kv_cache import KVCache
from ..model_runner import ModelRunner
from ..sampling import Sampler, SamplingParams
from .proposer import Proposal

if TYPE_CHECKING:
    from ...compiled import CompiledModel
    from ...config import Config
    from .proposer import Proposer

#: Ids whose text two tokenizers must agree on (a sample spread over the vocabulary).
SAMPLED_IDS = 256


class DraftProposer:
    """A draft model proposing from its own per-sequence caches (see the module docstring)."""

    def __init__(self, name: str, draft: CompiledModel, *, cost: float, max_context: int | None = None) -> None:
        self.name = name
        self.draft = draft  # (keeps the model and its backend alive)
        self.runner = ModelRunner(draft.backend, draft.model, max_context)
        #: Cost of one draft step relative to one target step (DepthPolicy's draft_cost).
        self.cost = cost
        self._caches: dict[Hashable, KVCache] = {}
        self._samplers: dict[Hashable, Sampler] = {}

    def propose(self, seq_id: Hashable, tokens: Sequence[int], k: int, params: SamplingParams) -> Proposal:
        tokens = list(tokens)
        limit = self.runner.max_context
        if limit is not None:
            k = min(k, limit - len(tokens))
        if k <= 0 or not tokens:
            return Proposal([])
        cache = self._caches.get(seq_id)
        if cache is None:
            cache = self._caches[seq_id] = self.runner.new_cache(1)
        held = cache.ids[0, :cache.length]
        n = min(len(held), len(tokens) - 1)  # at least one token is fed: its logits are needed
        same = held[:n] == np.asarray(tokens[:n], np.int64)
        common = int(np.argmin(same)) if not same.all() else n
        cache.truncate(common)
        logits = self.runner.step(cache, [tokens[common:]])[0]
        sampler = self._samplers.get(seq_id)
        if sampler is None or sampler.params != params:
            sampler = self._samplers[seq_id] = Sampler(params)
        proposed: list[int] = []
        rows: list[np.ndarray] = []
        for i in range(k):
            context = tokens + proposed
            if params.greedy:
                token = sampler(logits, context)
            else:
                q = sampler.probabilities(logits, context)
                token = _draw(sampler.rng, q)
                rows.append(q)
            proposed.append(token)
            if i + 1 < k:
                logits = self.runner.step(cache, [[token]])[0]
        return Proposal(proposed, np.stack(rows) if rows else None)

    def release(self, seq_id: Hashable) -> None:
        cache = self._caches.pop(seq_id, None)
        if cache is not None:
            cache.free()
        self._samplers.pop(seq_id, None)


def _draw(rng: np.random.Generator, probs: np.ndarray) -> int:
    from .verify import draw

    return draw(rng, probs)


def weight_bytes(model) -> int:
    """Bytes of a graph's constants: what one decode step reads (a memory-bound step's cost)."""
    return sum(v.const.nbytes for v in model.graph.initializers.values() if v.const is not None)


def load_draft(compiled: CompiledModel, config: Config) -> tuple[Proposer | None, str]:
    """Compile ``config.draft_model`` like the target (its config, without speculation) and check
    that it speaks the target's vocabulary; (None, why) when it does not."""
    from pathlib import Path

    from ...api import compile as compile_model
    from ...api import load
    from ...compiled import MANIFEST

    path = config.draft_model
    if (Path(path) / MANIFEST).is_file():  # a compiled model saved by CompiledModel.save()
        draft = load(path)
    else:
        draft = compile_model(path, config.replace(speculation=None, draft_model=None))
    why = vocabulary_mismatch(compiled, draft)
    if why:
        return None, f"draft model {path}: {why}; give a draft with the target's tokenizer"
    cost = weight_bytes(draft.model) / max(weight_bytes(compiled.model), 1)
    return DraftProposer("draft", draft, cost=cost), f"draft model {path}"


def vocabulary_mismatch(target: CompiledModel, draft: CompiledModel) -> str | None:
    """Why ``draft`` cannot propose for ``target`` (logit widths or tokenizers differ), or None."""
    from ...errors import ModelLoadError

    sizes = [ModelRunner(m.backend, m.model).vocab_size for m in (target, draft)]
    if sizes[0] is not None and sizes[1] is not None and sizes[0] != sizes[1]:
        return f"its vocabulary has {sizes[1]} tokens, the target's {sizes[0]}"
    try:
        mine, theirs = target.tokenizer, draft.tokenizer
    except ModelLoadError:
        return None  # token ids are all there is to compare: the widths agree
    if mine.vocab_size != theirs.vocab_size:
        return f"its tokenizer has {theirs.vocab_size} tokens, the target's {mine.vocab_size}"
    ids = np.linspace(0, mine.vocab_size - 1, min(SAMPLED_IDS, mine.vocab_size)).astype(int).tolist()
    for i in ids:
        if mine.decode([i], skip_special=False) != theirs.decode([i], skip_special=False):
            return f"token {i} is {theirs.decode([i], skip_special=False)!r} in its tokenizer but " \
                   f"{mine.decode([i], skip_special=False)!r} in the target's"
    return None
