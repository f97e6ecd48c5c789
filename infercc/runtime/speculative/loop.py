"""Speculative generation of one prompt: each step proposes up to k tokens, runs the target once on
[last token + proposals], keeps what verification accepts, and rolls the KV cache back over the
rest.

It is a ``Generation`` (generate.py) for one prompt, so results, streaming and the stop rules are
the plain loop's: every emitted token goes through ``_Row.take`` one at a time, so a stop id, a
stop string, ``max_new_tokens`` or a full context end the text exactly where decoding one token
per step would end it (tokens verified past that point are dropped). Greedy output is the plain
loop's token for token; sampled output has the target's distribution (verify.py) but not the
plain loop's tokens for a seed (the draws differ). The cache always holds prompt + output but the
last output token, as in the plain loop; a step appends [last + k proposals] and is truncated
back to the accepted ones (KVCache.truncate). Works on every backend the runner drives; the
generated-C runtime's single prompt takes the serving engine instead (generate.py: its paged
kernel writes verified K/V in place, while this loop's contiguous cache is copied every step), so
this loop serves ONNX Runtime (its in-place GQA buffer copies nothing) and the runner's callers.

Trees of candidates (``Config.speculation_tree_width`` > 1, a proposer with ``tree_width``, greedy
requests): the row [last token + the tree's nodes] runs once on ONNX Runtime's tree variant
(runtime/tree_ort.py, ``ModelRunner.step_tree``), ``verify_tree`` walks the target's choices, the
accepted path's K/V move to consecutive slots (``KVCache.move``, ``tree_attention.compact_moves``)
and the rest is truncated. Where the variant cannot be built the proposer's width is set to 1
(chains) and ``speculation_reason`` says why.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..generate import Generation, GenerationResult
from ..kv_cache import check_context
from ..tree_attention import compact_moves
from .policy import DepthPolicy, SpeculationStats
from .proposer import Proposal, Proposer, make_proposer
from .verify import count, verify_counted, verify_tree, warn_if_inexact

if TYPE_CHECKING:
    from ...compiled import CompiledModel
    from ...config import Config
    from ..model_runner import ModelRunner
    from ..sampling import SamplingParams
    from ..tokenizer import Tokenizer
    from ..tree_ort import OrtTree

log = logging.getLogger(__name__)
_LOCK = threading.Lock()

#: Sequence ids for proposers: a proposer is shared by every generation on its compiled model
#: (threads may generate at once), so each generation has its own key.
_SEQ_IDS = itertools.count()


class SpeculativeGeneration(Generation):
    """``Generation`` of one prompt with speculative decoding (see the module docstring)."""

    loop = "speculative"

    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer | None, prompts: list[list[int]],
                 params: SamplingParams, proposer: Proposer, policy: DepthPolicy, tree: OrtTree | None = None) -> None:
        """``tree``: the graph variant that verifies trees of candidates (``tree_ort``), None when
        the proposer's trees cannot be verified here (it should then propose chains)."""
        if len(prompts) != 1:
            raise ValueError("SpeculativeGeneration runs one prompt")
        super().__init__(runner, tokenizer, prompts, params)
        self.proposer = proposer
        self.policy = policy
        self.tree = tree
        self.stats = SpeculationStats()
        self.seq_id = ("generate", next(_SEQ_IDS))

    def __iter__(self) -> Iterator[tuple[int, str]]:
        row, runner = self.rows[0], self.runner
        check_context(len(row.prompt), runner.max_context)
        cache = runner.new_cache(1)
        start = time.perf_counter()
        decode_start = start
        try:
            hidden = [] if getattr(self.proposer, "needs_hidden", False) else None
            logits = runner.step(cache, [row.prompt], hidden=hidden)[0]
            self._take([row.sampler(logits, row.prompt, row.output)])
            self._observe(hidden, len(row.prompt) + 1, [0])
            self.prompt_seconds = time.perf_counter() - start
            decode_start = time.perf_counter()
            while True:
                piece = row.piece()
                if piece:
                    yield 0, piece
                if row.finish_reason is not None:
                    break
                sequence = row.prompt + row.output
                k = self._depth(len(sequence))
                proposal = self.proposer.propose(self.seq_id, sequence, k, self.params) if k else Proposal([])
                proposal = _clipped(proposal, k)
                hidden = [] if hidden is not None else None
                if proposal.is_tree and self.tree is not None:
                    emitted, rows = self._tree_step(cache, proposal, hidden)
                else:
                    logits = runner.step(cache, [[row.output[-1], *proposal.tokens]], all_logits=True,
                                         hidden=hidden)[0]
                    if proposal.tokens:
                        emitted = verify_counted(proposal, logits, row.sampler, row.prompt, row.output, self.stats,
                                                 self.policy, self.seq_id)
                        cache.truncate(len(sequence) + len(emitted) - 1)  # rejected proposals' K/V go
                    else:
                        emitted = [row.sampler(logits[-1], row.prompt, row.output)]
                    rows = list(range(len(emitted)))
                before = len(row.output)
                self._take(emitted)
                self._observe(hidden, len(row.prompt) + len(row.output), rows[:len(row.output) - before])
                self.decode_seconds = time.perf_counter() - decode_start
        finally:
            cache.free()
            self.proposer.release(self.seq_id)
            self.policy.release(self.seq_id)

    def _depth(self, length: int) -> int:
        """The policy's k, clipped so the step neither verifies tokens that could never be emitted
        (``max_new_tokens``) nor outgrows the context (the cache would hold length + k slots)."""
        row, runner = self.rows[0], self.runner
        k = self.policy.depth(self.seq_id)
        k = min(k, self.params.max_new_tokens - len(row.output) - 1)
        if runner.max_context is not None:
            k = min(k, runner.max_context - length)
        return max(k, 0)

    def _tree_step(self, cache, proposal: Proposal, hidden: list | None) -> tuple[list[int], list[int]]:
        """Verify a tree of candidates in one run of the tree variant (greedy: ``verify_tree``),
        bring the accepted path's K/V together and drop the rest; the emitted tokens and the rows
        whose logits chose them."""
        row = self.rows[0]
        start = cache.length  # the row's first token (the last output token) goes there
        parents = [-1] + [p + 1 for p in proposal.parents]
        logits = self.runner.step_tree(cache, [row.output[-1], *proposal.tokens], parents, self.tree, hidden)
        emitted, rows = verify_tree(proposal, logits, row.sampler, row.prompt, row.output)
        cache.move(compact_moves(start, rows))
        cache.truncate(start + len(rows))
        count(proposal, emitted, self.stats, self.policy, self.seq_id)
        return emitted, rows

    def _observe(self, hidden: list | None, length: int, rows: list[int]) -> None:
        """Hand a hidden-state proposer the states of the step just run whose logits chose the
        tokens it emitted (``rows`` of its positions, in order), the last being token ``length -
        1`` of the sequence."""
        if hidden and rows:
            states = hidden[0][0, rows] if hidden[0].ndim == 3 else hidden[0][:1]
            self.proposer.observe(self.seq_id, length, states)

    def _take(self, tokens: list[int]) -> None:
        """Emit tokens one by one under the row's rules; those after the end are dropped."""
        self.rows[0].take_all(tokens, self.runner.max_context)

    @property
    def results(self) -> list[GenerationResult]:
        results = super().results
        for result in results:
            result.speculation = self.stats
        return results


def _clipped(proposal: Proposal, k: int) -> Proposal:
    """At most ``k`` tokens (a proposer may return more than asked)."""
    if len(proposal.tokens) <= k:
        return proposal
    probs = proposal.probs[:k] if proposal.probs is not None else None
    return Proposal(list(proposal.tokens[:k]), probs)


def speculative_generation(compiled: CompiledModel, runner: ModelRunner, tokenizer: Tokenizer | None,
                           prompts: list[list[int]], params: SamplingParams,
                           method: str, own: Config | None = None) -> tuple[SpeculativeGeneration | None, str | None]:
    """The speculative generation for ``method`` (a request's ``speculation=``; ``own``: its own
    speculation fields, spec_engine.request_config), or (None, why it
    cannot run): the caller decodes plainly and reports the reason (a warning and
    ``GenerationResult.speculation_reason``), never an error -- but an unknown method name is one."""
    from ...config import SPECULATIONS
    from ...errors import ConfigError

    if method not in SPECULATIONS:
        raise ConfigError(f"speculation must be one of {list(SPECULATIONS)}, got {method!r}")
    if len(prompts) != 1:
        reason = "speculation on a batch of prompts runs on the serving engine"
    elif not runner.cached:
        reason = "the model has no KV cache (every step recomputes the sequence: nothing to verify in one step)"
    else:
        proposer, reason = proposer_for(compiled, method)
        if proposer is not None:
            draft_cost = getattr(proposer, "cost", 0.0)
            policy = DepthPolicy(own or compiled.config, draft_cost=draft_cost)
            tree, no_trees = _trees(compiled, runner, proposer)
            generation = SpeculativeGeneration(runner, tokenizer, prompts, params, proposer, policy, tree)
            generation.speculation_reason = no_trees
            if params.greedy:
                warn_if_inexact(compiled)
            return generation, None
    reason = f"speculation={method!r} is off for this request: {reason}"
    log.info("%s; decoding without it", reason)
    warnings.warn(f"{reason}; decoding without it", RuntimeWarning, stacklevel=5)
    return None, reason


def _trees(compiled: CompiledModel, runner: ModelRunner, proposer: Proposer) -> tuple[OrtTree | None, str | None]:
    """The tree variant when ``Config.speculation_tree_width`` > 1 and the proposer makes trees
    (their width set on it: 1 = chains where trees cannot be verified), and the note saying why
    chains are proposed instead (None: trees, or chains were asked for)."""
    from ..tree_ort import tree_variant

    width = compiled.config.speculation_tree_width
    if width <= 1 or not hasattr(proposer, "tree_width"):
        return None, None
    tree, why = tree_variant(compiled) if runner.backend is compiled.backend else (None, "the runner is not the model's")
    proposer.tree_width = width if tree is not None else 1
    return tree, None if tree is not None else f"trees of candidates off, chains proposed: {why}"


def proposer_for(compiled: CompiledModel, method: str) -> tuple[Proposer | None, str]:
    """``make_proposer`` once per compiled model, method and the config fields naming its weights
    (a config replaced after compiling takes effect): a draft is compiled (or a self-draft cut) on
    first use and kept with the model. Prompt lookup keeps state per sequence id, so each call gets
    its own."""
    config = compiled.config
    if method in ("auto", "prompt_lookup"):
        return make_proposer(compiled, method, config)
    key = (method, config.draft_model, config.draft_layers, config.speculation_heads)
    with _LOCK:
        cache = compiled.__dict__.setdefault("_speculation_proposers", {})
        if key not in cache:
            cache[key] = make_proposer(compiled, method, config)
        return cache[key]
