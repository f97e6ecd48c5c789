"""Handing a single prompt's sequence back from the paged serving engine to the C decode loop.

Why: one speculative prompt on the generated-C runtime runs on the paged engine (runtime/
generate.py: the paged kernel keeps only the verified tokens' K/V in place), and a step of the
engine costs more than a step of the C decode loop (templates/generate.c.j2): the forward runs are
the same C, but the engine pays Python per step (scheduler, block tables, feeds, sampling,
detokenizing) -- measured on SmolLM2-135M at one thread (thread CPU time, batch 1): 8.36 ms a step
against the loop's 7.83 ms per token (9.38 against 8.60 before the step's Python was cut down:
benchmarks/engine_step.py). That is what speculation costs while it proposes nothing: where guesses rarely stand, the depth policy turns speculation off, yet the
sequence kept paying the engine's step. Once the policy has kept it off for
``Config.speculation_hand_back`` decode steps in a row, the sequence moves: its K/V are copied out
of the pool once (``gather_past``) into a decode loop started on its tokens so far
(``Decoding(past=...)``), and the engine lets it go (``Engine.detach``). The rest decodes plainly
in C; greedy tokens are the same as on the engine (both argmax the same logits, ties to the
lowest id), so the output stays token for token plain greedy decoding.

What it does not change: a method whose policy keeps speculating where it does not pay. Measured
end to end (SmolLM2, self_draft, one thread, thread CPU time, 2 prompts x 96 tokens, 3 rounds,
on a loaded machine): grounded prompts 0.78x of plain decoding staying on the engine, 0.76x with
the hand-back; chat prompts 0.73x and 0.75x -- the self-draft's loss is its verify and draft
cost while it speculates, not the engine's step while it does not.

Only greedy requests move (the C sampler draws from its own generator, so a seeded sampling
request would change its tokens midway), without penalties, logprobs or a LoRA adapter, on the
C paged runner with a library that has a decode loop; ``hand_back_problem`` says why not.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING

import numpy as np

from ..codegen.decoding import Decoding
from .c_backend import CBackend
from .c_generate import c_loop_missing

if TYPE_CHECKING:
    from .engine import Engine
    from .paged_runner import PagedRunner


def hand_back_problem(engine: Engine, request_id: str) -> str | None:
    """Why ``request_id`` cannot move to the C decode loop (None: it can, now)."""
    runner = engine.runner
    if getattr(runner, "form", None) != "c-paged":
        return f"the engine runs {engine.form}, not the C paged runner"
    live = engine._live.get(request_id)
    if live is None:
        return "the request is not running"
    params, request = live.row.params, live.request
    why = c_loop_missing(engine.compiled.backend)
    if why is not None:
        return why
    if params.penalized:  # the loop would count the engine's output so far as prompt
        return "a request with penalties (the C loop counts only the tokens it generates itself)"
    if not params.greedy:
        return "a sampling request (the C sampler draws from a generator of its own)"
    if live.logprobs is not None:
        return "the request asks for logprobs (the C loop returns tokens only)"
    if request.adapter is not None:
        return "the request runs a LoRA adapter"
    if live.row.finish_reason is not None or request.num_computed != request.num_tokens - 1 or request.draft:
        return "the request is not between two decode steps"
    return None


def gather_past(runner: PagedRunner, block_table: list[int], n: int) -> list[np.ndarray]:
    """The K/V of a sequence's first ``n`` tokens out of the pool, one dense [1, heads, n, width]
    array per cache in the graph's cache order (``CacheSpec.entries``, the decode loop's order)."""
    bs = runner.block_size
    blocks = np.asarray(block_table[:-(-n // bs)], np.int64)
    past = []
    for entry in runner.cache_spec.entries:
        pool = runner.pools[entry.input]  # [num_blocks, heads, block_size, width]
        rows = pool[blocks].transpose(1, 0, 2, 3).reshape(pool.shape[1], -1, pool.shape[3])[:, :n]
        past.append(np.ascontiguousarray(rows[None]))
    return past


def hand_back(engine: Engine, request_id: str) -> Decoding:
    """Move ``request_id`` (``hand_back_problem`` None) to a C decode loop that goes on from its
    tokens so far; the engine forgets it. The caller drives the loop (c_generate.drive) with the
    request's row, ``engine._live[request_id].row`` before the call."""
    live = engine._live[request_id]
    request, row = live.request, live.row
    seq_id: Hashable = request.seq_id
    past = gather_past(engine.runner, engine.blocks.block_table(seq_id), request.num_computed)
    backend: CBackend = engine.compiled.backend
    decoding = backend.decoding(request.tokens(), max_new_tokens=row.params.max_new_tokens - len(row.output),
                                stop_ids=sorted(row.stop_ids), temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                                seed=0, max_context=engine.max_context, past=past)
    engine.detach(request_id)
    return decoding
