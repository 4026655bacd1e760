"""The strongest alternatives as baselines: smg's least_load, cache_aware and prefix_hash, vLLM 0.34's DP balancer,
and sbs's phase-aware cost without its window."""

from __future__ import annotations

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
        (rank("a", 0, running=50, kv_tokens=9e5), 0.0),  # decoding requests and held KV do not count
    ],
)
def test_least_load_score_is_seconds_of_queued_prefill_plus_kv_barrier(load: RankLoad, score: float) -> None:
    assert least_load_score(load) == pytest.approx(score)


def test_least_load_picks_least_queued_work_first_on_ties() -> None:
    policy = make_immediate_policy("least_load")
    ranks = [rank("a", 0, queued=900), rank("a", 1, queued=100, kv_usage=0.9), rank("b", 0, queued=300)]
    assert str(policy.choose(req("r", 10), ranks)) == "b/0", "a/1's KV barrier (1.35 s) outweighs 0.1 s of work"
    assert str(policy.choose(req("r", 10), [rank("a", 0), rank("a", 1)])) == "a/0"


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
    policy = CacheAware(balance_abs_threshold=2, balance_rel_threshold=1.5)
    ranks = [rank("a", 0, waiting=1), rank("a", 1), rank("a", 2)]
    # no match yet: the least loaded rank (ties by requests sent there, then order)
    assert str(policy.choose(with_blocks("r1", (1, 2, 3)), ranks)) == "a/1"
    assert str(policy.choose(with_blocks("r2", (9, 8)), ranks)) == "a/2", "a/1 already took one"
    # 2 of 3 blocks match (> 0.3): the holder of the matched prefix, though busier
    busy = [rank("a", 0), rank("a", 1, running=2), rank("a", 2)]
    assert str(policy.choose(with_blocks("r3", (1, 2, 7)), busy)) == "a/1"
    # a match of 1 block in 4 (0.25) is a miss
    assert str(policy.choose(with_blocks("r4", (1, 5, 6, 4)), busy)) == "a/0"
    # the holder's load exceeds mean * 1.5 and mean + 2: spill to the least loaded, which becomes a holder
    spill = [rank("a", 0, running=1), rank("a", 1, running=9), rank("a", 2, running=2)]
    assert str(policy.choose(with_blocks("r5", (1, 2, 3)), spill)) == "a/0"
    calm = [rank("a", 0, running=3), rank("a", 1, running=3), rank("a", 2)]
    assert str(policy.choose(with_blocks("r6", (1, 2, 3)), calm)) in {"a/0", "a/1"}, "either holder"
    # no blocks (an Azure trace): never a match
    assert str(policy.choose(req("r7", 100), calm)) == "a/2"


def test_cache_aware_holder_unusable_goes_to_first_candidate_without_insert() -> None:
    policy = CacheAware()
    policy.choose(with_blocks("r1", (1, 2)), [rank("a", 0, waiting=5), rank("a", 1)])
    ranks = [rank("a", 0, waiting=5), rank("a", 1, usable=False), rank("b", 0)]
    assert str(policy.choose(with_blocks("r2", (1, 2)), ranks)) == "a/0"
    assert str(policy.choose(with_blocks("r3", (1, 2)), ranks)) == "a/0", "still no holder inserted"


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
