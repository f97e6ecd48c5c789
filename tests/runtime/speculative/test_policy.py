"""The depth policy: full depth while proposals stand, off when they keep failing (and back after a
while), less under load, none when KV blocks run short; the stats' rates."""

from __future__ import annotations

from infercc import Config
from infercc.runtime.speculative import DepthPolicy, SpeculationStats
from infercc.runtime.speculative.policy import (
    COST_RANGE,
    EXPLORE_STEPS,
    PROBE_STEPS,
    VERIFY_COST,
    StepCosts,
    best_depth,
)


def test_depth_follows_acceptance_and_recovers():
    policy = DepthPolicy(Config(num_speculative_tokens=6))
    for _ in range(10):
        policy.record("a", 6, 6)
    assert policy.depth("a") == 6
    for _ in range(30):
        policy.record("b", 4, 0)
    assert policy.depth("b") == 0
    probes = 0
    for _ in range(200):  # proposals that keep failing: off, but probed now and then
        k = policy.depth("b")
        if k:
            probes += 1
            policy.record("b", k, 0)
    assert 0 < probes < 40
    policy.release("a")
    assert policy.rate("a") == policy.rate("never seen")


def test_load_and_memory_lower_the_depth():
    policy = DepthPolicy(Config(num_speculative_tokens=8))
    for _ in range(10):
        policy.record(1, 8, 6)
    alone = policy.depth(1)
    assert alone > 0
    assert policy.depth(1, running=32) < alone
    assert policy.depth(1, free_fraction=0.05) == 0
    throughput = DepthPolicy(Config(num_speculative_tokens=8, speculation_policy="throughput"))
    throughput.record(1, 8, 8)
    assert throughput.depth(1, waiting=3) == 0 and throughput.depth(1) > 0
    assert DepthPolicy(Config(), fixed=3).depth("x", running=100, free_fraction=0.0) == 3


def test_a_costly_draft_needs_higher_acceptance():
    assert best_depth(0.5, 0.0, 5) > 0 and best_depth(0.5, 0.6, 5) == 0
    assert best_depth(0.5, 0.0, 5, draft_cost=0.6) == 0
    assert best_depth(0.95, 0.08, 5) == 5 and best_depth(0.0, 0.0, 5) == 0


def test_a_batch_buys_less_depth():
    """Extra positions slow every row of a step: the same acceptance buys less depth beside other
    sequences, and none once their rows fill the compute (1 + 0.2 * 15 per step at 16 rows)."""
    alone = best_depth(0.8, 0.2, 8)
    assert alone > best_depth(0.8, 0.2, 8, others=3) > 0
    assert best_depth(0.6, 0.2, 8, others=15) == 0
    assert best_depth(0.6, 0.0, 8, others=15) == 8  # free positions: always worth it


def test_stats_rates():
    stats = SpeculationStats()
    assert stats.acceptance_rate == 0 and stats.tokens_per_step == 0
    stats.add(4, 3)
    stats.add(4, 1)
    assert stats.acceptance_rate == 0.5 and stats.tokens_per_step == 3.0
    assert stats.to_dict()["proposed"] == 8


def test_step_costs_measure_a_position_against_a_one_position_step():
    """c = (t5 / t1 - 1) / 4 from the fastest recent steps of each size: a step slowed by a
    descheduled worker never raises it, a faster one lowers it, and it stays in COST_RANGE."""
    costs = StepCosts()
    costs.step(5, 0.012)  # nothing to compare with yet
    assert costs.verify_cost == VERIFY_COST and costs.t1 is None
    assert costs.draft(3, 0.001) is None
    costs.step(1, 0.004)
    costs.step(1, 0.009)  # slowed: the minimum counts
    assert costs.t1 == 0.004 and costs.one_steps == 2
    assert abs(costs.verify_cost - 0.5) < 1e-9  # (12 / 4 - 1) / 4
    costs.step(5, 0.5)
    assert abs(costs.verify_cost - 0.5) < 1e-9
    costs.step(3, 10.0)  # another size, one slow step: the lower median of the sizes' costs
    assert abs(costs.verify_cost - 0.5) < 1e-9
    costs.step(5, 0.004)  # no dearer than one position: held at the floor
    assert costs.verify_cost == COST_RANGE[0]
    assert abs(costs.draft(2, 0.004) - 0.5) < 1e-9


def test_measured_costs_probe_first_then_decide():
    """With measured costs a batch-1 sequence first decodes plainly (timing t1), then speculates
    where its measured cost pays and stays off where it does not, at the same acceptance."""
    for step_seconds, speculates in ((0.0042, True), (0.02, False)):  # 5 positions: c = 0.0125 or 1.0
        costs = StepCosts()
        policy = DepthPolicy(Config(num_speculative_tokens=4), costs=costs)
        for _ in range(10):
            policy.record("a", 4, 3)
        assert [policy.depth("a") for _ in range(PROBE_STEPS)] == [0] * PROBE_STEPS
        for _ in range(PROBE_STEPS):
            costs.step(1, 0.004)
        costs.step(5, step_seconds)
        assert (policy.depth("a") > 0) == speculates
    drafted = DepthPolicy(Config(num_speculative_tokens=4), draft_cost=0.0, costs=costs)
    drafted.observe_draft(4, 0.016)  # a token of draft costs a whole step: 1.0
    drafted.observe_draft(4, 0.16)  # (slowed)
    assert abs(drafted.draft_cost - 1.0) < 1e-9


def test_a_noisy_verify_step_does_not_keep_speculation_off_for_good():
    """A verify step timed 50x slow (a descheduled worker) turns speculation off, but the
    sequence verifies one guess after EXPLORE_STEPS steps off, and a normal timing of that step
    turns it back on; while the step keeps costing too much it stays off in between."""
    costs = StepCosts()
    policy = DepthPolicy(Config(num_speculative_tokens=4), costs=costs)
    for _ in range(PROBE_STEPS):
        costs.step(1, 0.004)
    costs.step(5, 0.2)  # noise: c held at the top of COST_RANGE
    depths = [policy.depth("a") for _ in range(EXPLORE_STEPS)]
    assert depths[:-1] == [0] * (EXPLORE_STEPS - 1) and depths[-1] == 1
    costs.step(2, 0.0042)  # the probe's own step, timed normally
    policy.record("a", 1, 1)
    assert policy.depth("a") > 1


def test_the_fixed_policy_always_speculates_its_depth():
    """"fixed" keeps num_speculative_tokens whatever the acceptance and the measured costs (as
    vLLM does), off only when KV blocks run out, within the engine's budget in a batch."""
    costs = StepCosts()
    policy = DepthPolicy(Config(num_speculative_tokens=4, speculation_policy="fixed"), costs=costs)
    costs.step(1, 0.004)
    costs.step(5, 1.0)
    for _ in range(20):
        policy.record("a", 4, 0)
    assert policy.depth("a") == 4
    assert policy.depth("a", free_fraction=0.01) == 0
    budget = int(policy.config.max_speculation_compute_fraction * policy.config.max_batch_tokens)
    assert policy.depth("a", running=64) == min(4, budget // 64)
