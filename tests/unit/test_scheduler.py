"""The scheduler state machine and its asyncio dispatcher, driven with a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from gateway.config import (
    AllocatorConfig,
    DecodeConfig,
    EngineConfig,
    PhaseAwareConfig,
    Settings,
    WaterFillConfig,
    WindowConfig,
)
from gateway.dispatch import Dispatcher
from gateway.errors import NoCapacityError
from gateway.load.view import LoadView
from gateway.scheduling.scheduler import NoServingRankError, Scheduler, WindowFullError
from gateway.telemetry import GatewayMetrics
from gateway.types import RankKey
from tests import helpers
from tests.helpers import MODEL, req

WINDOW = WindowConfig(
    min_interval_s=0.01,
    max_interval_s=0.1,
    step_fraction=0.5,
    initial_step_s=0.1,
    close_when_idle=False,
    hold_min_arrivals=None,
)
"""Held until the tick even on an idle cluster and at any arrival rate, which is what these tests exercise
(closing at once is tested in ``test_step_aligned_close.py``)."""


def make_scheduler(
    policy: str, view: LoadView, window: WindowConfig = WINDOW, allocator: AllocatorConfig | None = None
) -> Scheduler:
    """A scheduler with water-filling (unless told otherwise) and the default decode-aware choice."""
    return Scheduler(
        policy, view, window=window, allocator=allocator or WaterFillConfig(), decode=DecodeConfig(), seed=0
    )


def make_view(dp_size: int = 4, engines: tuple[str, ...] = ("a",)) -> LoadView:
    return helpers.make_view(*engines, dp_size=dp_size)


def test_immediate_policy_places_at_submit_and_records_it():
    view = make_view()
    scheduler = make_scheduler("round_robin", view, WINDOW)
    keys = [scheduler.submit(req(f"r{i}", 100), 0.0) for i in range(5)]
    assert keys == [RankKey("a", 0), RankKey("a", 1), RankKey("a", 2), RankKey("a", 3), RankKey("a", 0)]
    assert view.inflight_count() == 5
    assert scheduler.poll(1.0) is None
    with pytest.raises(NoServingRankError):
        scheduler.submit(req("x", 1, model="other"), 0.0)


def test_sbs_buffers_until_the_tick_then_places_the_batch_balanced():
    view = make_view()
    scheduler = make_scheduler("sbs", view, WINDOW)
    for i, tokens in enumerate([4000, 100, 3000, 900, 2000]):
        assert scheduler.submit(req(f"r{i}", tokens, arrival_s=0.001 * i), 0.001 * i) is None
    assert scheduler.next_deadline() == pytest.approx(0.05)
    assert scheduler.poll(0.02) is None
    outcome = scheduler.poll(0.05)
    assert outcome is not None and outcome.deferred == 0 and not outcome.unplaceable
    placed = {r.request_id: k.rank for r, k in outcome.assigned}
    # longest first onto the emptiest rank: 4000 | 3000 | 2000 | 900 + 100
    assert placed == {"r0": 0, "r2": 1, "r4": 2, "r3": 3, "r1": 3}
    assert view.inflight_count() == 5
    assert scheduler.next_deadline() is None


def test_sbs_cancel_removes_a_buffered_request():
    scheduler = make_scheduler("sbs", make_view(), WINDOW)
    scheduler.submit(req("a", 10), 0.0)
    assert scheduler.cancel("a") and not scheduler.cancel("a")
    assert scheduler.poll(1.0) is None


def test_sbs_unserved_model_is_reported_unplaceable():
    scheduler = make_scheduler("sbs", make_view(), WINDOW)
    scheduler.submit(req("a", 10, model="other"), 0.0)
    outcome = scheduler.poll(1.0)
    assert outcome is not None and [r.request_id for r in outcome.unplaceable] == ["a"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def dispatcher(policy: str, clock: FakeClock) -> Dispatcher:
    settings = Settings(
        policy=policy,
        window=WINDOW,
        allocator=WaterFillConfig(),
        engines=[EngineConfig(name="a", flavor="vllm", url="http://127.0.0.1:1", dp_size=4, models=[MODEL])],
    )
    return Dispatcher(settings, make_view(), GatewayMetrics(), clock=clock)


async def test_dispatcher_resolves_waiters_when_the_window_closes():
    clock = FakeClock()
    d = dispatcher("sbs", clock)
    tasks = [asyncio.create_task(d.acquire(req(f"r{i}", 100))) for i in range(3)]
    await asyncio.sleep(0)
    assert not d.close_window_if_due()
    clock.now = 0.05
    assert d.close_window_if_due()
    placements = await asyncio.gather(*tasks)
    assert sorted(p.rank.rank for p in placements) == [0, 1, 2]
    assert {p.window_id for p in placements} == {1}
    for i in range(3):
        d.first_token(f"r{i}", "a")
        d.finish(f"r{i}")
    assert d.view.inflight_count() == 0


async def test_dispatcher_cancelled_waiter_leaves_no_trace():
    clock = FakeClock()
    d = dispatcher("sbs", clock)
    task = asyncio.create_task(d.acquire(req("gone", 100)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    clock.now = 1.0
    assert not d.close_window_if_due()
    assert d.view.inflight_count() == 0


async def test_dispatcher_loop_and_shutdown_fail_buffered_requests_cleanly():
    d = dispatcher("sbs", FakeClock())  # the fake clock never reaches the tick
    await d.start()
    task = asyncio.create_task(d.acquire(req("late", 100)))
    await asyncio.sleep(0.01)
    await d.stop()
    with pytest.raises(NoCapacityError):
        await task


async def test_dispatcher_immediate_unserved_model_is_no_capacity():
    d = dispatcher("least_tokens", FakeClock())
    with pytest.raises(NoCapacityError):
        await d.acquire(req("x", 1, model="other"))
    placement = await d.acquire(req("y", 1))
    assert placement.rank.engine == "a" and placement.window_id is None


def test_sbs_phase_aware_sends_the_batch_to_the_instance_about_to_start_a_step():
    view = make_view(dp_size=2, engines=("a", "b"))
    scheduler = make_scheduler("sbs", view, allocator=PhaseAwareConfig())
    # both instances are busy decoding; "a" ended a step just now, "b" half a step ago
    for engine, rid in (("a", "x"), ("b", "y")):
        view.on_dispatch(rid, RankKey(engine, 0), 10, 0.0, stream=True)
        view.on_first_token(rid, 0.0)
    scheduler.on_tokens("-", "b", 1, 0.0)
    scheduler.on_tokens("-", "a", 1, 0.04)
    scheduler.submit(req("r", 500, arrival_s=0.045), 0.045)
    assert scheduler.next_deadline() == pytest.approx(0.05)
    outcome = scheduler.poll(0.05)  # "b" starts its next step in 0.05 s, "a" in 0.09 s
    assert outcome is not None
    assert [(r.request_id, str(k)) for r, k in outcome.assigned] == [("r", "b/1")]


@pytest.mark.parametrize(
    ("limits", "prompts", "accepted"),
    [
        (dict(max_buffered_requests=2), [10, 10, 10], 2),
        (dict(max_buffered_tokens=250), [100, 100, 100], 2),
        (dict(max_buffered_tokens=250), [100, 200, 50], 2),  # the 200-token one does not fit, the next does
    ],
)
def test_the_window_is_bounded_in_requests_and_tokens(limits, prompts, accepted):
    scheduler = make_scheduler("sbs", make_view(), WINDOW.model_copy(update=limits))
    taken = 0
    for i, tokens in enumerate(prompts):
        try:
            scheduler.submit(req(f"r{i}", tokens), 0.0)
            taken += 1
        except WindowFullError:
            pass
    assert taken == accepted
    assert len(scheduler.window) == accepted


def test_adaptive_interval_switched_off_keeps_the_window_length():
    for adaptive, expected in ((True, 0.1), (False, 0.05)):
        view = make_view()
        scheduler = make_scheduler("sbs", view, WINDOW.model_copy(update={"adaptive_interval": adaptive}))
        view.on_dispatch("d", RankKey("a", 0), 10, 0.0, stream=True)
        scheduler.on_first_token("d", "a", 0.0)  # a step boundary of engine "a", whose rank 0 decodes "d" ...
        scheduler.on_tokens("d", "a", 1, 0.4)  # ... and the next: steps of 0.4 s, half of it past the 0.1 s bound
        scheduler.submit(req("r", 100), 0.4)
        scheduler.poll(0.401)
        assert scheduler.window.interval_s == pytest.approx(expected), f"adaptive={adaptive}"


def test_prefill_capacity_switched_off_places_what_water_filling_would_defer():
    # 4 ranks x 2 budgets of 8192 tokens hold 8 prompts of 8000; the 9th and 10th wait unless the model is off
    for capacity, deferred in ((True, 2), (False, 0)):
        scheduler = make_scheduler("sbs", make_view(), allocator=WaterFillConfig(queue_steps=2.0 if capacity else None))
        for i in range(10):
            scheduler.submit(req(f"r{i}", 8000), 0.0)
        outcome = scheduler.poll(1.0)
        assert outcome is not None and outcome.deferred == deferred, f"prefill_capacity={capacity}"
        assert len(outcome.assigned) == 10 - deferred
