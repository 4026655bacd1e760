"""Prefill water-filling (policy sbs), driven by tables of numbers."""

from __future__ import annotations

import pytest

from gateway.config import DecodeConfig, PhaseAwareConfig, WindowConfig
from gateway.scheduling.allocation import assigned_levels, free_prefill_capacity, water_fill
from gateway.scheduling.scheduler import Scheduler
from gateway.types import RankKey
from tests.helpers import make_view, rank, req


def placement(allocation) -> dict[str, str]:
    return {r.request_id: str(k) for r, k in allocation.assigned}


@pytest.mark.parametrize(
    ("prompts", "queued", "expected_levels"),
    [
        # four equal requests over four idle ranks: one each
        ([1000, 1000, 1000, 1000], [0, 0, 0, 0], [1000, 1000, 1000, 1000]),
        # longest first into the emptiest rank: 4000 | 3000+500 | 2000+1000; makespan 4000
        ([4000, 3000, 2000, 1000, 500], [0, 0, 0], [4000, 3500, 3000]),
        # an already loaded rank receives less
        ([2000, 2000, 2000], [6000, 0, 0], [6000, 4000, 2000]),
        # small requests fill the gaps left by queued work
        ([500, 500, 500, 500], [1000, 0], [1500, 1500]),
    ],
)
def test_water_filling_levels(prompts, queued, expected_levels):
    ranks = [rank("e", i, queued=q) for i, q in enumerate(queued)]
    batch = [req(f"r{i}", p, arrival_s=i * 0.001) for i, p in enumerate(prompts)]
    allocation = water_fill(batch, ranks, now=1.0, max_wait_s=10.0)
    levels = assigned_levels(allocation, ranks)
    assert [levels[RankKey("e", i)] for i in range(len(queued))] == expected_levels
    assert not allocation.deferred


def test_makespan_beats_round_robin_on_skewed_batch():
    prompts = [7000, 300, 300, 300, 6000, 300, 300, 300]
    ranks = [rank("e", i) for i in range(4)]
    batch = [req(f"r{i}", p, arrival_s=i) for i, p in enumerate(prompts)]
    levels = assigned_levels(water_fill(batch, ranks, now=10.0, max_wait_s=60), ranks)
    round_robin = [sum(prompts[i::4]) for i in range(4)]
    assert max(levels.values()) == 7000
    assert max(round_robin) == 13000  # both long prompts land on rank 0


def test_what_does_not_fit_is_deferred_in_arrival_order():
    ranks = [rank("e", 0, queued=8000, budget=8192), rank("e", 1, queued=7000, budget=8192)]
    batch = [req("late", 2000, arrival_s=0.2), req("early", 3000, arrival_s=0.1), req("fits", 1000, arrival_s=0.3)]
    allocation = water_fill(batch, ranks, now=0.5, max_wait_s=10.0, queue_steps=1)
    assert placement(allocation) == {"fits": "e/1"}
    assert [r.request_id for r in allocation.deferred] == ["early", "late"]


def test_oversized_prompt_takes_an_idle_rank_alone():
    ranks = [rank("e", 0, queued=100), rank("e", 1)]
    allocation = water_fill([req("huge", 20000)], ranks, now=0.0, max_wait_s=10.0)
    assert placement(allocation) == {"huge": "e/1"}


def test_starving_request_is_forced_onto_least_filled_rank():
    ranks = [rank("e", 0, queued=8000), rank("e", 1, queued=7900)]
    batch = [req("old", 2000, arrival_s=0.0), req("young", 2000, arrival_s=9.0)]
    allocation = water_fill(batch, ranks, now=10.0, max_wait_s=5.0, queue_steps=1)
    assert placement(allocation) == {"old": "e/1"}
    assert [r.request_id for r in allocation.deferred] == ["young"]


@pytest.mark.parametrize(
    ("loads", "winner"),
    [
        # equal prefill levels: fewest running requests wins
        ([dict(running=10), dict(running=3), dict(running=7)], 1),
        # equal running: lowest reported KV usage wins
        ([dict(running=5, kv_usage=0.6), dict(running=5, kv_usage=0.2), dict(running=5, kv_usage=0.4)], 1),
        # equal running and KV usage: fewest local KV tokens
        ([dict(running=5, kv_tokens=900), dict(running=5, kv_tokens=800), dict(running=5, kv_tokens=100)], 2),
        # prefill level dominates decode load
        ([dict(running=0, queued=4000), dict(running=50, queued=0)], 1),
    ],
)
def test_ties_broken_by_decode_load(loads, winner):
    ranks = [rank("e", i, **kw) for i, kw in enumerate(loads)]
    allocation = water_fill([req("a", 100)], ranks, now=0.0, max_wait_s=10.0)
    assert placement(allocation) == {"a": f"e/{winner}"}


def test_skips_unusable_ranks_full_kv_and_other_models():
    ranks = [
        rank("e", 0, usable=False),
        rank("e", 1, kv_usage=0.99),
        rank("e", 2, models=frozenset({"other"})),
        rank("e", 3, running=100),
    ]
    allocation = water_fill([req("a", 100)], ranks, now=0.0, max_wait_s=10.0)
    assert placement(allocation) == {"a": "e/3"}


def test_unserved_model_is_unplaceable():
    allocation = water_fill([req("a", 100, model="nope")], [rank("e", 0)], now=0.0, max_wait_s=1.0)
    assert [r.request_id for r in allocation.unplaceable] == ["a"]
    assert not allocation.assigned and not allocation.deferred


def test_capacity_spans_queue_steps_budgets():
    ranks = [rank("e", 0, queued=8000, budget=8192), rank("e", 1, queued=7000, budget=8192)]
    batch = [req("a", 5000, arrival_s=0.1), req("b", 3000, arrival_s=0.2)]
    # one budget: nothing fits; two budgets (the step in progress + the next): both do
    assert not water_fill(batch, ranks, now=0.3, max_wait_s=10.0, queue_steps=1).assigned
    assert placement(water_fill(batch, ranks, now=0.3, max_wait_s=10.0, queue_steps=2)) == {"a": "e/1", "b": "e/0"}


@pytest.mark.parametrize(("queue_steps", "free"), [(1, 192 + 0 + 8192), (2, 8384 + 7384 + 16384)])
def test_free_capacity_sums_usable_headroom(queue_steps, free):
    ranks = [rank("e", 0, queued=8000), rank("e", 1, queued=9000), rank("e", 2), rank("e", 3, usable=False)]
    assert free_prefill_capacity(ranks, queue_steps) == free


def test_a_request_deferred_before_is_placed_ahead_of_a_longer_newcomer():
    # room for one of the two: water-filling alone would take the longer newcomer and defer the old one again
    ranks = [rank("e", 0, queued=100, budget=1000)]
    old, new = req("old", 600, arrival_s=0.0), req("new", 800, arrival_s=0.5)
    old.deferrals = 1
    allocation = water_fill([new, old], ranks, now=1.0, max_wait_s=10, queue_steps=1)
    assert [q.request_id for q, _ in allocation.assigned] == ["old"]
    assert [q.request_id for q in allocation.deferred] == ["new"]


def test_shortest_first_places_the_short_prompt_even_ahead_of_one_deferred_before():
    # room for one of the two: shortest first takes the newcomer and defers the old, longer one again
    ranks = [rank("e", 0, queued=100, budget=1000)]
    old, new = req("old", 800, arrival_s=0.0), req("new", 600, arrival_s=0.5)
    old.deferrals = 3
    allocation = water_fill([old, new], ranks, now=1.0, max_wait_s=10, queue_steps=1, shortest_first=True)
    assert [q.request_id for q, _ in allocation.assigned] == ["new"]
    assert [q.request_id for q in allocation.deferred] == ["old"]
    # ... until it has waited max_wait_s: then it is placed wherever it does not fit
    allocation = water_fill([old, new], ranks, now=10.0, max_wait_s=10, queue_steps=1, shortest_first=True)
    assert sorted(q.request_id for q, _ in allocation.assigned) == ["new", "old"]


TICK = WindowConfig(min_interval_s=0.01, max_interval_s=0.01)


def test_the_scheduler_passes_shortest_first_to_phase_aware_placement():
    view = make_view("e", dp_size=1, budget=1000)
    allocator = PhaseAwareConfig(shortest_first=True, queue_steps=1, min_queue_tokens=0)
    scheduler = Scheduler("sbs", view, window=TICK, allocator=allocator, decode=DecodeConfig())
    view.on_dispatch("busy", RankKey("e", 0), 300, 0.0, stream=True)  # the rank has room for 700 more tokens
    scheduler.submit(req("long", 650, arrival_s=0.0), 0.0)
    scheduler.submit(req("short", 500, arrival_s=0.001), 0.001)
    outcome = scheduler.poll(0.02)
    assert outcome is not None and [q.request_id for q, _ in outcome.assigned] == ["short"]


@pytest.mark.parametrize(("isolation", "engine"), [(False, "a"), (True, "b")])
def test_the_scheduler_passes_long_prefill_isolation_to_phase_aware_placement(isolation, engine):
    # budgets of 1000 tokens: 2 budgets of capacity, or the default floor of 16,384 tokens, hold b's 900 + 100
    view = make_view("a", "b", dp_size=2, budget=1000)
    allocator = PhaseAwareConfig(long_prefill_tokens=5000 if isolation else None)
    scheduler = Scheduler("sbs", view, window=TICK, allocator=allocator, decode=DecodeConfig())
    view.on_dispatch("long", RankKey("a", 0), 6000, 0.0, stream=True)  # over 5000 tokens: a is slow
    for index in (0, 1):
        view.on_dispatch(f"b{index}", RankKey("b", index), 900, 0.0, stream=True)
    scheduler.submit(req("short", 100, arrival_s=0.0), 0.0)  # by cost alone: a's free rank
    outcome = scheduler.poll(0.02)
    assert outcome is not None and [k.engine for _, k in outcome.assigned] == [engine]


@pytest.mark.parametrize(("min_tokens", "placed"), [(0, False), (16_384, True)])
def test_a_rank_takes_at_least_min_queue_tokens_whatever_its_budget(min_tokens, placed):
    # budgets of 2048: two of them (4096) hold no 3000-token prompt behind 2000 queued; a 16,384-token floor does
    ranks = [rank("e", 0, queued=2000, budget=2048)]
    allocation = water_fill([req("r", 3000)], ranks, now=0.0, max_wait_s=10, queue_steps=2, min_queue_tokens=min_tokens)
    assert bool(allocation.assigned) is placed and bool(allocation.deferred) is not placed
    assert free_prefill_capacity(ranks, 2, min_tokens) == max(4096, min_tokens) - 2000


@pytest.mark.parametrize(("min_tokens", "placed"), [(0, 0), (16_384, 1)])
def test_the_scheduler_passes_min_queue_tokens_to_phase_aware_placement(min_tokens, placed):
    view = make_view("e", dp_size=1, budget=1000)
    allocator = PhaseAwareConfig(min_queue_tokens=min_tokens)
    scheduler = Scheduler("sbs", view, window=TICK, allocator=allocator, decode=DecodeConfig())
    view.on_dispatch("busy", RankKey("e", 0), 1500, 0.0, stream=True)  # 2 budgets of 1000 leave room for 500
    scheduler.submit(req("r", 1000, arrival_s=0.0), 0.0)
    outcome = scheduler.poll(0.02)
    assert outcome is not None and (len(outcome.assigned), outcome.deferred) == (placed, 1 - placed)
