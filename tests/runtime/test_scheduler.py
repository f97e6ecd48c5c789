"""The scheduler alone, over real block managers (no model): the token budget's order (decodes,
then prompt chunks), FCFS admission, max_num_seqs, preemption of the newest request to the front of
the queue, and a random workload in which every request finishes and every block comes back."""

from __future__ import annotations

import random

import pytest

from infercc import InputError
from infercc.runtime.block_manager import BlockManager
from infercc.runtime.contiguous_runner import ReservedBlocks
from infercc.runtime.scheduler import RUNNING, WAITING, Request, Scheduler, SchedulerOutput


def request(rid: str, prompt_len: int, max_new: int = 8) -> Request:
    return Request(rid, list(range(1, prompt_len + 1)), prompt_len + max_new - 1)


def sizes(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(s.request.request_id, s.start, s.num_tokens) for s in out.scheduled]


def finish_step(scheduler: Scheduler, out: SchedulerOutput, token: int = 7) -> list[Request]:
    """What the engine does after the runner: record the computed tokens, then 'sample' a token for
    every request whose known tokens are all computed; returns those requests."""
    scheduler.computed(out)
    sampled = [item.request for item in out.scheduled if item.request.prefilled]
    for request in sampled:
        request.output.append(token)
    return sampled


def reserved(num_blocks: int = 64, reserve: int = 64) -> ReservedBlocks:
    return ReservedBlocks(num_blocks, 16, reserve)


def test_decodes_go_first_then_chunks_of_waiting_prompts():
    scheduler = Scheduler(reserved(), max_batch_tokens=10, max_num_seqs=8)
    for rid, n in (("a", 4), ("b", 3)):
        scheduler.add(request(rid, n))
    out = scheduler.schedule()
    assert sizes(out) == [("a", 0, 4), ("b", 0, 3)]
    finish_step(scheduler, out)
    scheduler.add(request("c", 20))
    out = scheduler.schedule()  # two decode tokens, then 8 of c's 20 prompt tokens
    assert sizes(out) == [("a", 4, 1), ("b", 3, 1), ("c", 0, 8)]
    finish_step(scheduler, out)
    out = scheduler.schedule()  # c's prefill goes on among the running, no token sampled for it yet
    assert sizes(out) == [("a", 5, 1), ("b", 4, 1), ("c", 8, 8)]
    assert not scheduler.requests["c"].output
    finish_step(scheduler, out)
    assert sizes(scheduler.schedule()) == [("a", 6, 1), ("b", 5, 1), ("c", 16, 4)]


def test_budget_smaller_than_the_running_set_serves_the_oldest():
    scheduler = Scheduler(reserved(), max_batch_tokens=2, max_num_seqs=8)
    for rid in "abc":
        scheduler.add(request(rid, 1))
    assert sizes(scheduler.schedule()) == [("a", 0, 1), ("b", 0, 1)]
    assert [r.request_id for r in scheduler.waiting] == ["c"]


def test_fcfs_admission_stops_at_the_first_request_that_does_not_fit():
    scheduler = Scheduler(reserved(num_blocks=8), max_batch_tokens=100, max_num_seqs=8)  # two sequences of 4 blocks
    for rid in "abcd":
        scheduler.add(request(rid, 2))
    assert [s.request.request_id for s in scheduler.schedule().scheduled] == ["a", "b"]
    assert [r.request_id for r in scheduler.waiting] == ["c", "d"]
    scheduler.finish(scheduler.requests["a"])
    assert [s.request.request_id for s in scheduler.schedule().scheduled] == ["b", "c"]


def test_max_num_seqs_caps_the_running_set():
    scheduler = Scheduler(reserved(), max_batch_tokens=100, max_num_seqs=2)
    for rid in "abc":
        scheduler.add(request(rid, 2))
    scheduler.schedule()
    assert [r.request_id for r in scheduler.running] == ["a", "b"] and scheduler.requests["c"].status == WAITING


def test_add_refuses_taken_ids_and_requests_larger_than_the_pool():
    scheduler = Scheduler(ReservedBlocks(4, 16, 64), max_batch_tokens=16, max_num_seqs=4)
    scheduler.add(request("a", 10))
    with pytest.raises(InputError, match="'a' is already in use"):
        scheduler.add(request("a", 10))
    with pytest.raises(InputError, match=r"may hold 72 tokens .* = 5 KV blocks of 16, but the whole pool has 4"):
        scheduler.add(request("big", 65, max_new=8))
    assert list(scheduler.requests) == ["a"]


def test_finish_frees_blocks_of_running_and_forgets_waiting():
    blocks = reserved(num_blocks=4)
    scheduler = Scheduler(blocks, max_batch_tokens=100, max_num_seqs=8)
    scheduler.add(request("a", 3))
    scheduler.add(request("b", 3))
    scheduler.schedule()
    assert blocks.report().used == 4 and scheduler.requests["a"].status == RUNNING
    for rid in ("a", "b"):
        scheduler.finish(scheduler.requests[rid])
    assert blocks.report().used == 0 and not scheduler.has_unfinished()


def test_out_of_blocks_preempts_the_newest_to_the_front_of_the_queue():
    blocks = BlockManager(4, 4, prefix_caching=False)
    scheduler = Scheduler(blocks, max_batch_tokens=100, max_num_seqs=8)
    for rid in "abc":
        scheduler.add(request(rid, 4))  # one full block each: three of the four blocks
    scheduler.add(request("d", 5))  # needs two: waits
    out = scheduler.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["a", "b", "c"]
    finish_step(scheduler, out)
    out = scheduler.schedule()  # a's decode takes the last block; b's needs one more: c (newest) goes
    assert [r.request_id for r in out.preempted] == ["c"]
    assert sizes(out) == [("a", 4, 1), ("b", 4, 1)]
    assert [r.request_id for r in scheduler.waiting] == ["c", "d"]
    c = scheduler.requests["c"]
    assert c.num_computed == 0 and c.preemptions == 1 and c.output == [7] and scheduler.num_preemptions == 1
    finish_step(scheduler, out)
    scheduler.finish(scheduler.requests["a"])
    out = scheduler.schedule()  # c is readmitted first and recomputes prompt + its sampled token
    assert sizes(out) == [("b", 5, 1), ("c", 0, 5)]


def test_a_request_that_must_preempt_itself_waits():
    blocks = BlockManager(2, 4, prefix_caching=False)
    scheduler = Scheduler(blocks, max_batch_tokens=100, max_num_seqs=8)
    scheduler.add(request("a", 2, max_new=3))  # room left in its block
    scheduler.add(request("b", 4, max_new=4))  # its block is full
    finish_step(scheduler, scheduler.schedule())
    out = scheduler.schedule()  # b's decode needs a block, none is free, and b is the newest: b goes
    assert [r.request_id for r in out.preempted] == ["b"] and sizes(out) == [("a", 2, 1)]
    finish_step(scheduler, out)
    assert sizes(scheduler.schedule()) == [("a", 3, 1)]  # b (2 blocks now) waits for a
    scheduler.finish(scheduler.requests["a"])
    assert sizes(scheduler.schedule()) == [("b", 0, 5)]


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_finishes_everything_and_returns_every_block(seed):
    """Random arrivals, lengths and aborts on a small pool with prefix caching: the budget and
    max_num_seqs hold every step, every request ends with its max tokens, and the pool ends empty."""
    rng = random.Random(seed)
    blocks = BlockManager(12, 4)
    scheduler = Scheduler(blocks, max_batch_tokens=rng.choice([3, 8, 32]), max_num_seqs=rng.choice([4, 8]))
    expected: dict[str, int] = {}
    shared = [rng.randrange(50) for _ in range(9)]
    for step in range(2000):
        if step < 60 and rng.random() < 0.5:
            rid = f"r{step}"
            n, max_new = rng.randrange(1, 14), rng.randrange(1, 20)
            prompt = shared[:rng.randrange(10)] + [rng.randrange(50) for _ in range(n)]
            scheduler.add(Request(rid, prompt, len(prompt) + max_new - 1))
            expected[rid] = max_new
        if scheduler.running and rng.random() < 0.05:
            victim = rng.choice(scheduler.running)
            scheduler.finish(victim)
            del expected[victim.request_id]
        if not scheduler.has_unfinished():
            if step >= 60:
                break
            continue
        out = scheduler.schedule()
        # nothing scheduled only when the one request left preempted itself (it is readmitted next)
        assert out.scheduled or [r.request_id for r in out.preempted] == [r.request_id for r in scheduler.waiting][:1]
        assert out.num_tokens <= scheduler.max_batch_tokens and len(scheduler.running) <= scheduler.max_num_seqs
        for item in out.scheduled:
            assert blocks.num_tokens(item.request.seq_id) >= item.start + item.num_tokens
        for request in finish_step(scheduler, out, token=rng.randrange(50)):
            if len(request.output) >= expected[request.request_id]:
                scheduler.finish(request)
                assert len(request.output) == expected.pop(request.request_id)
    assert not expected and not scheduler.has_unfinished() and scheduler.num_preemptions > 0
    report = blocks.report()
    assert report.used == 0 and report.free + report.cached == report.total


def test_drafts_are_booked_last_and_shrink_instead_of_preempting():
    """Speculated tokens come after every decode and prompt chunk, within ``spec_budget`` and the
    free blocks: a draft that would need a block the pool lacks shrinks (never a preemption), and
    ``accepted`` keeps only the accepted tokens (the rest leave the block manager, uncomputed)."""
    blocks = BlockManager(3, 16)
    scheduler = Scheduler(blocks, max_batch_tokens=64, max_num_seqs=8, spec_budget=6)
    scheduler.add(request("a", 14, max_new=30))  # 14 + 30 - 1 = 43 tokens: 3 blocks
    finish_step(scheduler, scheduler.schedule())  # prefill; a has 15 known tokens, 14 computed
    scheduler.add(request("b", 20, max_new=8))    # 2 blocks: the rest of the pool
    a = scheduler.requests["a"]
    a.draft = [5, 6, 7, 8, 9]
    out = scheduler.schedule()
    # a's decode (position 14), then b's prompt takes the 2 free blocks: a's draft gets the one slot
    # left in its own block
    assert sizes(out) == [("a", 14, 2), ("b", 0, 20)] and out.scheduled[0].draft == (5,)
    assert out.scheduled[0].tokens() == [7, 5] and not out.preempted
    scheduler.computed(out)
    assert a.num_computed == 15 and blocks.num_tokens("a") == 16  # the draft is not computed yet
    scheduler.accepted(out.scheduled[0], 0)  # 5 was rejected
    assert a.num_computed == 15 and blocks.num_tokens("a") == 15
    a.output.append(3)  # the model's own token instead
    scheduler.requests["b"].output.append(4)
    a.draft = [1] * 5
    out = scheduler.schedule()  # no block is free: a's draft shrinks to nothing, nobody is preempted
    assert sizes(out) == [("a", 15, 1), ("b", 20, 1)] and out.scheduled[0].draft == () and not out.preempted


def test_the_speculation_budget_caps_all_drafts_of_a_step():
    scheduler = Scheduler(reserved(), max_batch_tokens=64, max_num_seqs=8, spec_budget=5)
    for rid in "abc":
        scheduler.add(request(rid, 4, max_new=20))
    finish_step(scheduler, scheduler.schedule())
    for rid in "abc":
        scheduler.requests[rid].draft = [9, 9, 9]
    out = scheduler.schedule()
    assert [len(s.draft) for s in out.scheduled] == [3, 2, 0]  # oldest first, 5 in all
