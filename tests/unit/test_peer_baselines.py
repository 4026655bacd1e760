"""The strongest alternatives as baselines: smg's least_load, cache_aware and prefix_hash, vLLM 0.34's DP balancer,
and sbs's phase-aware cost without its window."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from gateway.config import PhaseAwareConfig
from gateway.scheduling.baselines import make_immediate_policy
from gateway.scheduling.baselines.base import ImmediatePolicy
from gateway.scheduling.baselines.cache_aware import CacheAware
from gateway.scheduling.baselines.least_load import least_load_score
from gateway.scheduling.baselines.prefix_hash import PrefixHash
from gateway.scheduling.baselines.vllm_dplb import vllm_dplb_score
from gateway.scheduling.phase import PhaseAware
from gateway.scheduling.scheduler import PhasePlacement
from gateway.scheduling.step_clock import StepClock
from gateway.types import PendingRequest, RankLoad
from tests.helpers import rank, req


def with_blocks(request_id: str, blocks: tuple[int, ...], arrival_s: float = 0.0) -> PendingRequest:
    return replace(req(request_id, 512 * len(blocks), arrival_s), prefix_blocks=blocks)


@pytest.mark.parametrize(
    ("load", "score"),
    [
        (rank("a", 0), 0.0),
        (rank("a", 0, queued=4000), 2.0),  # 4,000 tokens at the default 2,000 tokens/s
        (rank("a", 0, queued=2000, kv_usage=0.5), 1.0 + 0.15),  # + λ k/(1-k) = 0.15 * 1
        (rank("a", 0, kv_usage=1.0), 0.15 * 0.999 / 0.001),  # k clamped to 0.999
        (rank("a", 0, running=3, kv_tokens=9e5), 3 * 1024 / 2000),  # running at 1,024 tokens each; KV held: no
    ],
)
def test_least_load_score_is_seconds_of_queued_and_running_work_plus_kv_barrier(load: RankLoad, score: float) -> None:
    assert least_load_score(load) == pytest.approx(score)


def test_least_load_picks_the_least_expected_wait_and_draws_ties() -> None:
    policy = make_immediate_policy("least_load")
    ranks = [rank("a", 0, queued=900), rank("a", 1, queued=100, kv_usage=0.9), rank("b", 0, queued=300)]
    assert str(policy.choose(req("r", 10), ranks)) == "b/0", "a/1's KV barrier (1.35 s) outweighs 0.1 s of work"
    busy = [rank("a", 0, running=1), rank("a", 1, queued=1000)]
    assert str(policy.choose(req("r", 10), busy)) == "a/1", "1,000 queued tokens < one running request's 1,024"
    tied = [rank("a", 0), rank("a", 1), rank("a", 2)]
    picks = Counter(str(policy.choose(req(f"r{i}", 10), tied)) for i in range(300))
    assert set(picks) == {"a/0", "a/1", "a/2"} and min(picks.values()) > 60, "ties drawn uniformly"


@pytest.mark.parametrize(
    ("load", "score"),
    [
        (rank("a", 0, waiting=2, running=3), 5.0),
        (rank("a", 0, waiting=2, running=3, kv_usage=0.5), 5.0),  # penalty starts above half the KV
        (rank("a", 0, waiting=2, running=3, kv_usage=1.0), 5.0 + 2 * 6 * 0.5),
        (rank("a", 0, waiting=0, running=3, kv_usage=1.0), 3.0),  # no waiting, no penalty
    ],
)
def test_vllm_dplb_score(load: RankLoad, score: float) -> None:
    assert vllm_dplb_score(load) == pytest.approx(score)


def test_vllm_dplb_rotates_its_scan_start_by_one_each_pick() -> None:
    policy = make_immediate_policy("vllm_dplb")
    tied = [rank("a", 0), rank("a", 1), rank("a", 2)]
    assert [str(policy.choose(req(f"r{i}", 1), tied)) for i in range(4)] == ["a/0", "a/1", "a/2", "a/0"]
    loaded = [rank("a", 0, waiting=1), rank("a", 1), rank("a", 2)]
    assert str(policy.choose(req("r", 1), loaded)) == "a/1", "the scan starts at 1; a/1 is lowest"
    hot = [rank("a", 0, waiting=4, kv_usage=0.9), rank("a", 1, running=6), rank("a", 2, running=9)]
    assert str(policy.choose(req("r", 1), hot)) == "a/1", "4 waiting at 90% KV score 4 + 9.6, above 6 running"


def test_cache_aware_follows_the_prefix_until_the_spill_gate() -> None:
    policy = CacheAware()
    ranks = [rank("a", 0, queued=500), rank("a", 1), rank("a", 2, queued=100)]
    # no match yet: the least expected wait
    assert str(policy.choose(with_blocks("r1", (1, 2, 3)), ranks)) == "a/1"
    # 2 of 3 blocks match (> 0.3): the holder of the matched prefix, though it has the most work
    busy = [rank("a", 0), rank("a", 1, running=2, queued=3000), rank("a", 2)]
    assert str(policy.choose(with_blocks("r2", (1, 2, 7)), busy)) == "a/1"
    # a match of 1 block in 4 (0.25) is a miss
    assert str(policy.choose(with_blocks("r3", (1, 5, 6, 4)), busy)) in {"a/0", "a/2"}
    # no blocks (an Azure trace): never a match
    assert str(policy.choose(req("r4", 100), busy)) in {"a/0", "a/2"}


@pytest.mark.parametrize(
    ("loads", "over"),
    [
        # mean 2: margin max(4, ceil(2 * 1.41)) = 4; the holder needs > 3 (1.5x) and > 6 requests
        ((6, 0, 0), False),
        ((7, 0, 0), True),
        # mean 36: margin min(64, ceil(2 * 6)) = 12; > 54 (1.5x) and > 48
        ((54, 36, 18), False),
        ((55, 35, 18), True),
        # mean 1,000: margin capped at 64; > 1,500 (1.5x) decides
        ((1500, 750, 750), False),
        ((1503, 750, 747), True),
    ],
)
def test_cache_aware_spill_gate_margin_follows_the_mean(loads: tuple[int, int, int], over: bool) -> None:
    policy = CacheAware()
    mean = sum(loads) / 3
    assert policy.over_gate(loads[0], mean) is over
    policy.choose(with_blocks("seed", (1, 2)), [rank("a", 0), rank("a", 1, running=1), rank("a", 2, running=1)])
    ranks = [rank("a", i, running=n) for i, n in enumerate(loads)]
    chosen = str(policy.choose(with_blocks("hot", (1, 2)), ranks))
    assert (chosen != "a/0") is over, "over the gate, the request spills off the holder"


def test_cache_aware_spills_to_ranks_under_the_gate_and_they_become_holders() -> None:
    policy = CacheAware()
    policy.choose(with_blocks("seed", (1, 2)), [rank("a", 0), rank("a", 1, running=1), rank("a", 2, running=1)])
    hot = [rank("a", 0, running=20), rank("a", 1, running=9), rank("a", 2, running=1)]  # mean 10, gate > 15 and > 17
    assert str(policy.choose(with_blocks("r1", (1, 2)), hot)) == "a/2"
    calm = [rank("a", 0, running=5), rank("a", 1, running=1), rank("a", 2, running=5)]
    assert str(policy.choose(with_blocks("r2", (1, 2)), calm)) in {"a/0", "a/2"}, "either holder, never a/1"


def test_cache_aware_unusable_holders_count_as_a_miss() -> None:
    policy = CacheAware()
    policy.choose(with_blocks("r1", (1, 2)), [rank("a", 0), rank("a", 1, running=1)])
    ranks = [rank("a", 0, usable=False), rank("a", 1, running=1), rank("b", 0)]
    assert str(policy.choose(with_blocks("r2", (1, 2)), ranks)) == "b/0"


def test_cache_aware_evicts_least_recently_used_leaves_at_its_interval() -> None:
    policy = CacheAware(eviction_interval_s=60.0, max_tree_blocks=2)
    one = [rank("a", 0)]
    policy.choose(with_blocks("old", (1, 2), arrival_s=0.0), one)
    policy.choose(with_blocks("new", (5, 6), arrival_s=30.0), one)
    policy.choose(with_blocks("tick", (), arrival_s=60.0), one)  # the interval passed: cut 4 pairs to 2
    two = [rank("a", 0, running=9), rank("a", 1)]
    assert str(policy.choose(with_blocks("q1", (1, 2), arrival_s=61.0), two)) == "a/1", "the old prompt evicted"
    assert str(policy.choose(with_blocks("q2", (5, 6), arrival_s=62.0), two)) == "a/0", "new kept"


def test_prefix_hash_is_consistent_and_sheds_overload() -> None:
    policy = PrefixHash()
    ranks = [rank("a", i) for i in range(4)]
    targets = {str(policy.choose(with_blocks(f"r{h}", (h, 99)), ranks)) for h in range(40)}
    assert len(targets) == 4, "heads spread over the ring"
    home = str(policy.choose(with_blocks("x", (7,)), ranks))
    assert str(policy.choose(with_blocks("y", (7, 1, 2)), ranks)) == home, "same first block, same rank"
    # home over both max(mean * 1.25, mean + 10): the least loaded rank under the threshold
    loaded = [rank("a", i, running=30 if str(rank("a", i).key) == home else i) for i in range(4)]
    shed = str(policy.choose(with_blocks("z", (7,)), loaded))
    assert shed != home
    assert shed == min((r for r in loaded if str(r.key) != home), key=lambda r: r.running).key.__str__()
    assert str(policy.choose(req("n", 10), loaded)) == shed, "no head: least loaded"


def phase_policy(clock: StepClock) -> ImmediatePolicy:
    return make_immediate_policy("phase_aware", steps=PhasePlacement(PhaseAwareConfig(), None, clock))


def test_phase_aware_needs_the_scheduler_step_placement() -> None:
    with pytest.raises(ValueError, match="step clock"):
        make_immediate_policy("phase_aware")


@pytest.mark.parametrize(
    ("ranks", "winner", "why"),
    [
        ([rank("a", 0, running=4), rank("b", 0, running=4)], "b/0", "a is mid-step (0.4 s to go), b's step is overdue"),
        ([rank("a", 0), rank("b", 0, running=4)], "a/0", "a is idle: no wait for its step"),
        (
            [rank("a", 0, running=4), rank("b", 0, running=4, queued=20000)],
            "a/0",
            "b's queue fills two whole steps of its 8k budget",
        ),
        ([rank("a", 0, running=4), rank("b", 0, usable=False)], "a/0", "only a is usable"),
    ],
)
def test_phase_aware_places_each_request_at_its_soonest_first_token(
    ranks: list[RankLoad], winner: str, why: str
) -> None:
    clock = StepClock(0.5)
    clock.on_tokens("a", 9.9)  # a's step began at 9.9 s and is predicted to last 0.5 s
    clock.on_tokens("b", 9.0)  # b's began at 9.0 s: overdue
    assert str(phase_policy(clock).choose(req("r", 1000, arrival_s=10.0), ranks)) == winner, why


def test_phase_aware_agrees_with_the_sbs_allocator_on_a_batch_of_one() -> None:
    clock = StepClock(0.05)
    allocator = PhaseAware(PhaseAwareConfig(queue_steps=None), None, clock)
    policy = phase_policy(clock)
    for loads in (
        [rank("a", 0, queued=300), rank("a", 1), rank("b", 0, running=5), rank("b", 1, queued=9000)],
        [rank("a", 0, queued=20000, running=2), rank("a", 1, queued=100), rank("b", 0, queued=50)],
    ):
        request = req("r", 4000)
        expected = allocator.place([request], loads, 0.0).assigned[0][1]
        assert policy.choose(request, loads) == expected
    assert policy.choose(req("r", 1, model="other"), [rank("a", 0)]) is None
