"""Step phase tracking and phase-aware placement, driven by tables of numbers."""

from __future__ import annotations

import pytest

from gateway.scheduling.phase import phase_fill
from gateway.scheduling.step_clock import StepClock
from gateway.types import RankKey
from tests.helpers import rank, req


def test_step_clock_finds_boundaries_and_learns_the_duration_model():
    clock = StepClock(0.05, initial_per_token_s=1e-3, boundary_gap_s=0.005, alpha=1.0)
    assert clock.time_to_next_step("e", 0.0) == 0.0  # never seen: assume it can start now
    assert clock.on_tokens("e", 0.000)
    assert not clock.on_tokens("e", 0.002)  # same burst
    assert clock.predict("e", 0) == 0.05 and clock.predict("e", 100) == pytest.approx(0.15)
    assert clock.on_tokens("e", 0.100)  # a decode-only step of 0.1 s
    assert clock.predict("e", 0) == pytest.approx(0.1)
    clock.set_step_prefill("e", 1000)
    assert clock.time_to_next_step("e", 0.15) == pytest.approx(0.1 + 1.0 - 0.05)  # per-token still the guess
    assert clock.on_tokens("e", 0.400)  # 0.3 s with 1000 prefill tokens: 0.2 s over the base
    assert clock.predict("e", 2000) == pytest.approx(0.1 + 2000 * 2e-4)
    assert clock.current_step_prefill_tokens("e") == 0
    assert clock.time_to_next_step("e", 0.45) == pytest.approx(0.05)
    assert clock.time_to_next_step("e", 9.0) == 0.0  # overdue


def test_step_clock_mean_step_time_is_an_ewma_per_engine_averaged_over_engines():
    clock = StepClock(0.05, mean_alpha=0.5, max_step_s=30.0)
    assert clock.mean_step_s() == 0.05  # nothing seen: the initial guess
    for t in (0.0, 0.1, 0.3):  # engine "a": steps of 0.1 s then 0.2 s
        clock.on_tokens("a", t)
    clock.on_tokens("a", 0.301)  # same burst: no step
    for t in (0.0, 0.4, 100.4):  # engine "b": a step of 0.4 s, then 100 s of silence (idle, not a step)
        clock.on_tokens("b", t)
    clock.on_tokens("c", 0.0)  # one boundary only: no step time yet
    assert clock.engine_mean_step_s("a") == pytest.approx(0.15)
    assert clock.engine_mean_step_s("b") == pytest.approx(0.4)
    assert clock.engine_mean_step_s("c") == 0.05
    assert clock.mean_step_s() == pytest.approx((0.15 + 0.4) / 2)


@pytest.mark.parametrize("kw", [dict(initial_step_s=0.0), dict(alpha=0.0), dict(mean_alpha=1.5)])
def test_step_clock_rejects_bad_settings(kw):
    args = dict(initial_step_s=0.05) | kw
    with pytest.raises(ValueError):
        StepClock(**args)


def busy_clock(ends: dict[str, float], step_s: float = 1.0) -> StepClock:
    clock = StepClock(step_s, initial_per_token_s=1e-4)
    for engine, last_boundary in ends.items():
        clock.on_tokens(engine, last_boundary)
    return clock


@pytest.mark.parametrize(
    ("engines", "loads", "winner"),
    [
        # an idle instance starts at once; the busy one is 0.9 s from its next step
        ({"a": 0.0}, {"a": dict(running=5), "b": {}}, "b/0"),
        # both busy: the one whose step ends sooner
        ({"a": 0.0, "b": 0.8}, {"a": dict(running=5), "b": dict(running=5)}, "a/0"),
        # same phase: the rank with no prompt tokens bound for the next step
        ({"a": 0.0}, {"a": dict(running=5, queued=3000)}, "a/1"),
    ],
)
def test_phase_fill_picks_the_soonest_first_token(engines, loads, winner):
    clock = busy_clock(engines)
    ranks = []
    for engine in ("a", "b"):
        kw = loads.get(engine)
        if kw is None:
            continue
        ranks.append(rank(engine, 0, **kw))
        ranks.append(rank(engine, 1, running=kw.get("running", 0)))
    allocation = phase_fill([req("r", 500)], ranks, clock, {}, now=0.1, max_wait_s=10, queue_steps=2)
    assert [str(k) for _, k in allocation.assigned] == [winner]


def test_phase_fill_avoids_a_rank_whose_queue_fills_whole_steps():
    clock = busy_clock({"a": 0.0, "b": 0.0})
    ranks = [rank("a", 0, running=1, queued=12000), rank("b", 0, running=1, queued=500)]
    current = {RankKey("a", 0): 0.0, RankKey("b", 0): 500.0}
    allocation = phase_fill([req("r", 800)], ranks, clock, current, now=0.1, max_wait_s=10, queue_steps=2)
    assert [str(k) for _, k in allocation.assigned] == ["b/0"]


def test_phase_fill_spreads_a_batch_over_an_idle_instance_longest_first():
    clock = busy_clock({})
    ranks = [rank("a", i) for i in range(4)]
    batch = [req(f"r{i}", t) for i, t in enumerate([300, 4000, 1200, 2500, 100])]
    allocation = phase_fill(batch, ranks, clock, {}, now=0.0, max_wait_s=10, queue_steps=2)
    placed = {r.request_id: k.rank for r, k in allocation.assigned}
    assert placed["r1"] != placed["r3"] != placed["r2"]
    assert len({placed["r1"], placed["r3"], placed["r2"]}) == 3  # the three long prompts run in parallel
    assert not allocation.deferred and not allocation.unplaceable


def test_phase_fill_defers_what_fits_nowhere_and_reports_unserved_models():
    clock = busy_clock({"a": 0.0})
    ranks = [rank("a", 0, running=1, queued=16000, budget=8192)]
    allocation = phase_fill(
        [req("big", 2000, arrival_s=0.05), req("other", 10, model="x")],
        ranks,
        clock,
        {},
        now=0.1,
        max_wait_s=10,
        queue_steps=2,
    )
    assert [r.request_id for r in allocation.deferred] == ["big"]
    assert [r.request_id for r in allocation.unplaceable] == ["other"]


def slow_and_fast_instances(b_queued: float = 0.0) -> list:
    """Instance ``a``: rank 0 holds 50,000 queued prompt tokens (over 5 budgets of 8192: a long prefill), rank 1
    is free. Instance ``b``: two ranks holding ``b_queued`` tokens each."""
    return [
        rank("a", 0, running=1, queued=50_000),
        rank("a", 1, running=1),
        rank("b", 0, running=1, queued=b_queued),
        rank("b", 1, running=1, queued=b_queued),
    ]


@pytest.mark.parametrize(("steps", "winner"), [(None, "b/0"), (40_960, "a/1")])
def test_long_prefill_isolation_sends_a_long_prompt_to_the_instance_already_prefilling_one(steps, winner):
    # b starts its next step sooner, so by cost alone the long prompt goes there and slows all of b's steps
    clock = busy_clock({"a": 0.8, "b": 0.0})
    allocation = phase_fill(
        [req("long", 45_000)], slow_and_fast_instances(), clock, {}, now=1.5, max_wait_s=10, queue_steps=2,
        long_prefill_tokens=steps,
    )  # fmt: skip
    assert [str(k) for _, k in allocation.assigned] == [winner]


@pytest.mark.parametrize(("steps", "winner"), [(None, "a/1"), (40_960, "b/0")])
def test_long_prefill_isolation_keeps_a_short_prompt_off_the_slow_instance(steps, winner):
    # a starts its next step much sooner, so by cost alone the short prompt would go there, into a's long steps
    clock = busy_clock({"a": 0.0, "b": 1.4})
    allocation = phase_fill(
        [req("short", 500)], slow_and_fast_instances(), clock, {}, now=1.5, max_wait_s=10, queue_steps=2,
        long_prefill_tokens=steps,
    )  # fmt: skip
    assert [str(k) for _, k in allocation.assigned] == [winner]


def test_long_prefill_isolation_still_uses_the_slow_instance_when_nothing_else_fits():
    clock = busy_clock({"a": 0.8, "b": 0.0})
    ranks = slow_and_fast_instances(b_queued=16_000)  # b is full: 2 budgets queued on each rank
    allocation = phase_fill(
        [req("short", 500)], ranks, clock, {}, now=1.5, max_wait_s=10, queue_steps=2, long_prefill_tokens=40_960
    )
    assert [str(k) for _, k in allocation.assigned] == ["a/1"] and not allocation.deferred
