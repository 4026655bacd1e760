"""Immediate-dispatch baselines over rank-load snapshots."""

from __future__ import annotations

from collections import Counter

import pytest

from gateway.scheduling.baselines import make_immediate_policy
from tests.helpers import make_view, rank, req


def choose_many(name: str, ranks, n: int, seed: int = 0) -> list[str]:
    policy = make_immediate_policy(name, seed=seed)
    return [str(policy.choose(req(f"r{i}", 100), ranks)) for i in range(n)]


def test_round_robin_cycles_over_serving_usable_ranks():
    ranks = [rank("a", 0), rank("a", 1, usable=False), rank("b", 0), rank("b", 1, models=frozenset({"x"}))]
    assert choose_many("round_robin", ranks, 4) == ["a/0", "b/0", "a/0", "b/0"]


@pytest.mark.parametrize(
    ("name", "loads", "winner"),
    [
        ("shortest_queue", [dict(running=3, waiting=1), dict(running=1, waiting=1), dict(running=0, waiting=5)], 1),
        ("least_tokens", [dict(queued=100, kv_tokens=900), dict(queued=2000), dict(kv_tokens=500)], 2),
        # as the load view keeps them, a waiting prompt is in both queued and KV tokens: total tokens count it once
        (
            "sglang_total_tokens",
            [dict(queued=100, kv_tokens=1000), dict(queued=2000, kv_tokens=2000), dict(kv_tokens=500)],
            2,
        ),
        ("sglang_total_tokens", [dict(queued=1000, kv_tokens=1000), dict(kv_tokens=1500)], 0),
        # equal tokens: SGLang breaks the tie by total requests (running + waiting)
        ("sglang_total_tokens", [dict(kv_tokens=500, running=3), dict(kv_tokens=500, running=1, waiting=1)], 1),
        # vLLM weighs a waiting request as four running ones: 1*4+1=5, 0*4+6=6, 2*4+0=8
        ("vllm_internal", [dict(waiting=1, running=1), dict(running=6), dict(waiting=2)], 0),
    ],
)
def test_least_loaded_wins(name, loads, winner):
    ranks = [rank("e", i, **kw) for i, kw in enumerate(loads)]
    assert choose_many(name, ranks, 1) == [f"e/{winner}"]


@pytest.mark.parametrize("name", ["shortest_queue", "least_tokens", "vllm_internal"])
def test_ties_are_spread_not_piled_on_rank_zero(name):
    ranks = [rank("e", i) for i in range(4)]
    assert Counter(choose_many(name, ranks, 8)) == {"e/0": 2, "e/1": 2, "e/2": 2, "e/3": 2}


def test_sglang_total_tokens_takes_the_lowest_rank_on_a_full_tie_and_sees_its_own_dispatches_via_the_view():
    ranks = [rank("e", i) for i in range(4)]
    assert choose_many("sglang_total_tokens", ranks, 3) == ["e/0", "e/0", "e/0"]  # the snapshot is not updated
    view = make_view("e", dp_size=4)
    policy = make_immediate_policy("sglang_total_tokens")
    placed = []
    for i in range(4):  # the optimistic update: each dispatch adds its prompt to the rank's tokens at once
        key = policy.choose(req(f"r{i}", 100), view.snapshot(0.0))
        assert key is not None
        view.on_dispatch(f"r{i}", key, 100, 0.0, stream=True)
        placed.append(str(key))
    assert placed == ["e/0", "e/1", "e/2", "e/3"]


def test_power_of_two_is_seeded_and_prefers_the_shorter_queue():
    ranks = [rank("e", 0, running=100), rank("e", 1), rank("e", 2, running=100), rank("e", 3, running=100)]
    first = choose_many("power_of_two", ranks, 50, seed=7)
    assert first == choose_many("power_of_two", ranks, 50, seed=7)
    counts = Counter(first)
    # rank 1 wins every pair it is sampled in: half of all pairs contain it
    assert counts["e/1"] > 15
    assert counts["e/1"] == max(counts.values())


def test_no_serving_rank_gives_none_and_unknown_name_raises():
    assert make_immediate_policy("round_robin").choose(req("a", 1, model="nope"), [rank("e", 0)]) is None
    assert make_immediate_policy("power_of_two").choose(req("a", 1, model="nope"), [rank("e", 0)]) is None
    with pytest.raises(ValueError, match="unknown"):
        make_immediate_policy("fastest")


def test_random_is_seeded_and_covers_every_serving_rank():
    ranks = [rank("e", i) for i in range(4)] + [rank("x", 0, usable=False)]
    first = choose_many("random", ranks, 200, seed=3)
    assert first == choose_many("random", ranks, 200, seed=3)
    assert first != choose_many("random", ranks, 200, seed=4)
    assert set(first) == {"e/0", "e/1", "e/2", "e/3"}


def test_least_waiting_ignores_running_requests_and_rotates_ties():
    ranks = [rank("a", 0, waiting=2, running=0), rank("a", 1, waiting=0, running=30), rank("b", 0, waiting=1)]
    assert choose_many("least_waiting", ranks, 1) == ["a/1"], "fewest waiting, however many decode"
    tied = [rank("a", 0), rank("a", 1), rank("b", 0, waiting=1)]
    assert choose_many("least_waiting", tied, 4) == ["a/0", "a/1", "a/0", "a/1"]
