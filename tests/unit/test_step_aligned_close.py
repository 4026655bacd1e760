"""Step-aligned window closing: the pure close-time rule, and the scheduler timing its window with it; and closing
at once where holding cannot help (an idle instance, engines that align their own prefill)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.config import DecodeConfig, EngineConfig, PhaseAwareConfig, Settings, StepAlignedCloseConfig, WindowConfig
from gateway.dispatch import Dispatcher
from gateway.load.view import LoadView
from gateway.scheduling.scheduler import Scheduler
from gateway.scheduling.step_aligned_close import StepAlignedClosing, close_at_once_reason, next_step_starts
from gateway.scheduling.step_clock import StepClock
from gateway.telemetry import GatewayMetrics
from gateway.types import RankKey
from tests.helpers import MODEL, make_view, rank, req

CLOSING = StepAlignedClosing(lead_s=0.005, min_interval_s=0.01, max_interval_s=0.5)


@pytest.mark.parametrize(
    ("opened_s", "starts", "close_s"),
    [
        (1.0, [1.2, 1.1], 1.095),  # lead_s before the instance that starts first
        (1.0, [1.3], 1.295),
        (1.0, [1.012], 1.01),  # its lead would fall inside min_interval_s: the shortest window
        (1.0, [0.9, 1.3], 1.01),  # an overdue instance starts any moment: the shortest window
        (1.0, [5.0], 1.5),  # far away: the longest window
    ],
)
def test_close_lands_lead_before_the_earliest_predicted_step_start_within_the_bounds(opened_s, starts, close_s):
    assert CLOSING.close_at(opened_s, starts) == pytest.approx(close_s)


@pytest.mark.parametrize(
    "kw",
    [dict(lead_s=-0.001), dict(min_interval_s=0.0), dict(min_interval_s=0.6, max_interval_s=0.5)],
)
def test_closing_rejects_bad_settings(kw):
    args = dict(lead_s=0.005, min_interval_s=0.01, max_interval_s=0.5) | kw
    with pytest.raises(ValueError):
        StepAlignedClosing(**args)


def test_close_needs_a_predicted_start():
    with pytest.raises(ValueError):
        CLOSING.close_at(1.0, [])


def clock_with_boundaries(boundaries: dict[str, float]) -> StepClock:
    clock = StepClock(0.1)
    for engine, t in boundaries.items():
        clock.on_tokens(engine, t)
    return clock


@pytest.mark.parametrize(
    ("boundaries", "loads", "starts"),
    [
        # both busy and seen: each one's last boundary plus its predicted step (0.1 s, nothing learnt yet)
        ({"a": 0.0, "b": 0.05}, {"a": dict(running=3), "b": dict(waiting=1)}, [0.1, 0.15]),
        # "b" is idle: it can start at once, nothing to align to
        ({"a": 0.0, "b": 0.05}, {"a": dict(running=3), "b": {}}, None),
        # "b" is busy but none of its tokens were seen yet
        ({"a": 0.0}, {"a": dict(running=3), "b": dict(running=3)}, None),
        # "b" has no usable rank: it does not count
        ({"a": 0.0}, {"a": dict(running=3), "b": dict(usable=False)}, [0.1]),
    ],
)
def test_next_step_starts_of_the_instances(boundaries, loads, starts):
    ranks = [rank(engine, i, **kw) for engine, kw in loads.items() for i in range(2)]
    got = next_step_starts(ranks, clock_with_boundaries(boundaries))
    assert got == (None if starts is None else pytest.approx(starts))


WINDOW = WindowConfig(
    min_interval_s=0.01,
    max_interval_s=0.1,
    step_fraction=0.5,
    initial_step_s=0.1,
    step_aligned_close=StepAlignedCloseConfig(lead_s=0.005),
    hold_min_arrivals=None,
)


def make_scheduler(view: LoadView, window: WindowConfig = WINDOW) -> Scheduler:
    return Scheduler("sbs", view, window=window, allocator=PhaseAwareConfig(), decode=DecodeConfig())


def two_busy_instances() -> tuple[LoadView, Scheduler]:
    """Instances "a" and "b" of 2 ranks, each decoding one request; steps of 0.1 s assumed."""
    view = make_view("a", "b", dp_size=2)
    scheduler = make_scheduler(view)
    for engine in ("a", "b"):
        view.on_dispatch(f"decoding-{engine}", RankKey(engine, 0), 10, 0.0, stream=True)
        view.on_first_token(f"decoding-{engine}", 0.0)
    return view, scheduler


def test_closes_are_staggered_across_the_instances_step_boundaries():
    _, scheduler = two_busy_instances()
    scheduler.on_tokens("-", "a", 1, 0.0)  # "a" next starts at 0.1, "b" at 0.15
    scheduler.on_tokens("-", "b", 1, 0.05)
    scheduler.submit(req("r1", 500, arrival_s=0.06), 0.06)
    deadline = scheduler.next_deadline()
    assert deadline == pytest.approx(0.095)  # just before "a" starts
    assert scheduler.poll(0.09) is None
    outcome = scheduler.poll(deadline)
    assert outcome is not None and [(r.request_id, k.engine) for r, k in outcome.assigned] == [("r1", "a")]

    scheduler.on_tokens("-", "a", 1, 0.1)  # "a" started its step: next at 0.2; "b" is next, at 0.15
    scheduler.submit(req("r2", 500, arrival_s=0.11), 0.11)
    deadline = scheduler.next_deadline()
    assert deadline == pytest.approx(0.145)
    assert scheduler.poll(0.14) is None
    outcome = scheduler.poll(deadline)
    assert outcome is not None and [(r.request_id, k.engine) for r, k in outcome.assigned] == [("r2", "b")]


def test_the_deadline_follows_a_boundary_seen_while_the_window_is_open():
    _, scheduler = two_busy_instances()
    scheduler.on_tokens("-", "a", 1, 0.0)
    scheduler.on_tokens("-", "b", 1, 0.05)
    scheduler.submit(req("r", 500, arrival_s=0.06), 0.06)
    assert scheduler.next_deadline() == pytest.approx(0.095)
    scheduler.on_tokens("-", "a", 1, 0.07)  # "a" ended a step of 0.07 s, not 0.1: it learns, next start 0.14
    assert scheduler.poll(0.08) is None
    assert scheduler.next_deadline() == pytest.approx(0.135)


def test_falls_back_to_the_grid_tick_while_an_instance_is_idle_or_unseen():
    view, _ = two_busy_instances()
    scheduler = make_scheduler(view, WINDOW.model_copy(update={"close_when_idle": False}))
    scheduler.submit(req("r1", 500, arrival_s=0.02), 0.02)  # no tokens seen from either instance yet
    assert scheduler.next_deadline() == pytest.approx(0.05)  # the grid tick: interval 0.5 * 0.1 s
    assert scheduler.poll(0.05) is not None
    for engine in ("a", "b"):
        scheduler.on_tokens("-", engine, 1, 0.06)  # both seen now ...
    view.on_finish("r1", 0.06)
    view.on_finish("decoding-b", 0.06)  # ... but "b" is idle
    scheduler.submit(req("r2", 500, arrival_s=0.07), 0.07)
    assert scheduler.next_deadline() == pytest.approx(0.1)


def test_switched_off_the_window_keeps_its_grid_tick():
    view, _ = two_busy_instances()
    scheduler = make_scheduler(view, WINDOW.model_copy(update={"step_aligned_close": None}))
    scheduler.on_tokens("-", "a", 1, 0.0)
    scheduler.on_tokens("-", "b", 1, 0.05)
    scheduler.submit(req("r", 500, arrival_s=0.06), 0.06)
    assert scheduler.next_deadline() == pytest.approx(0.1)
    assert scheduler.poll(0.095) is None


def test_on_tokens_says_which_chunks_begin_a_step():
    _, scheduler = two_busy_instances()
    assert scheduler.on_tokens("-", "a", 1, 0.0)
    assert not scheduler.on_tokens("-", "a", 1, 0.001)  # the same burst of chunks: the same step end
    assert scheduler.on_tokens("-", "a", 1, 0.1)


async def test_the_live_window_loop_closes_at_a_step_boundary_seen_while_it_sleeps():
    """The loop sleeps until the close its last poll computed; a step boundary seen meanwhile can make the close
    due much earlier, and must wake it (the simulator polls at every step end)."""
    now = [0.0]
    view = make_view("a", dp_size=2, stale_after_s=1e9)
    settings = Settings(
        policy="sbs",
        window=WINDOW.model_copy(update={"max_interval_s": 1000.0, "initial_step_s": 500.0}),
        engines=[EngineConfig(name="a", flavor="vllm", url="http://127.0.0.1:1", dp_size=2, models=[MODEL])],
    )
    d = Dispatcher(settings, view, GatewayMetrics(), clock=lambda: now[0])
    view.on_dispatch("decoding", RankKey("a", 0), 10, 0.0, stream=True)
    d.first_token("decoding", "a")  # a step boundary at 0; the next step predicted 500 s later
    await d.start()
    try:
        waiter = asyncio.create_task(d.acquire(req("r", 100, arrival_s=0.01)))
        now[0] = 0.01
        await asyncio.sleep(0.05)
        assert not waiter.done() and d.scheduler.next_deadline() == pytest.approx(499.995)
        now[0] = 0.2
        d.tokens("decoding", "a", 1)  # the step ended after 0.2 s: the next is predicted to start at 0.4
        await asyncio.sleep(0.05)
        # the loop woke and re-timed the close (without the wake it would sleep on for 500 s)
        # (the prior of 500 s keeps a weight of 1e-6 steps: 0.5 ms)
        assert d.scheduler.next_deadline() == pytest.approx(0.395, abs=1e-3)
        now[0] = 0.396
        placement = await asyncio.wait_for(waiter, timeout=30)
        assert placement.rank == RankKey("a", 1)
    finally:
        await d.stop()


# -- closing at once where holding cannot help ------------------------------------------------------------


@pytest.mark.parametrize(
    ("loads", "aligned", "flags", "reason"),
    [
        ({"a": dict(running=3), "b": {}}, set(), {}, "idle"),  # "b" starts a step the moment the request lands
        ({"a": dict(running=3), "b": dict(queued=500)}, set(), {}, None),  # queued prefill: busy
        ({"a": dict(running=3), "b": dict(waiting=1)}, {"a", "b"}, {}, "engine_aligned"),
        ({"a": dict(running=3), "b": dict(waiting=1)}, {"a"}, {}, None),  # "b" does not align its own
        ({"a": dict(running=3), "b": {}}, {"a", "b"}, {}, "idle"),  # idle is checked first
        ({"a": dict(running=3), "b": {}}, set(), {"when_idle": False}, None),
        ({"a": dict(running=3), "b": dict(waiting=1)}, {"a", "b"}, {"yield_to_alignment": False}, None),
        ({"a": dict(running=3), "b": dict(usable=False)}, {"a"}, {}, "engine_aligned"),  # unusable: not counted
        ({"a": dict(running=3), "b": dict(models=frozenset({"other"}))}, set(), {}, None),  # idle, other model
        ({"a": dict(usable=False)}, {"a"}, {}, None),  # nothing serves it: the allocator says so
    ],
)
def test_close_at_once_reason(loads, aligned, flags, reason):
    ranks = [rank(engine, i, **kw) for engine, kw in loads.items() for i in range(2)]
    kw = dict(when_idle=True, yield_to_alignment=True) | flags
    assert close_at_once_reason(req("r", 500), ranks, aligned, **kw) == reason


@pytest.mark.parametrize(("expected", "minimum", "reason"), [(0.3, 1.0, "alone"), (1.0, 1.0, None), (0.3, None, None)])
def test_a_window_expecting_no_company_is_not_held(expected, minimum, reason):
    ranks = [rank("a", i, running=3) for i in range(2)]
    kw = dict(when_idle=True, yield_to_alignment=True, expected_arrivals=expected, min_arrivals=minimum)
    assert close_at_once_reason(req("r", 500), ranks, set(), **kw) == reason


def test_a_request_reaching_an_idle_cluster_is_placed_at_once():
    view = make_view("a", "b", dp_size=2)
    scheduler = make_scheduler(view)
    scheduler.submit(req("r1", 500, arrival_s=0.02), 0.02)
    assert scheduler.next_deadline() == 0.02
    outcome = scheduler.poll(0.02)
    assert outcome is not None and [r.request_id for r, _ in outcome.assigned] == ["r1"]
    assert scheduler.closed_at_once() == {"idle": 1, "engine_aligned": 0, "alone": 0}


def test_a_request_joining_an_open_window_waits_for_its_close():
    _, scheduler = two_busy_instances()
    scheduler.submit(req("r1", 500, arrival_s=0.02), 0.02)
    assert scheduler.next_deadline() == pytest.approx(0.05)  # busy, nothing seen yet: the grid tick
    scheduler.submit(req("r2", 500, arrival_s=0.03), 0.03)
    assert scheduler.next_deadline() == pytest.approx(0.05)
    assert scheduler.closed_at_once() == {"idle": 0, "engine_aligned": 0, "alone": 0}


def test_engines_that_align_their_own_prefill_get_requests_at_once_and_step_alignment_does_not_undo_it():
    _, scheduler = two_busy_instances()
    scheduler.on_tokens("-", "a", 1, 0.0)  # step-aligned close would wait for 0.095
    scheduler.on_tokens("-", "b", 1, 0.05)
    scheduler.set_prefill_alignment("a", True)
    scheduler.set_prefill_alignment("b", True)
    assert scheduler.prefill_aligned_engines == {"a", "b"}
    scheduler.submit(req("r1", 500, arrival_s=0.06), 0.06)
    assert scheduler.next_deadline() == 0.06
    scheduler.on_tokens("-", "a", 1, 0.06)  # a boundary seen before the poll re-times nothing
    outcome = scheduler.poll(0.06)
    assert outcome is not None and len(outcome.assigned) == 1
    assert scheduler.closed_at_once() == {"idle": 0, "engine_aligned": 1, "alone": 0}

    scheduler.set_prefill_alignment("b", False)  # one instance holds nothing itself: the window holds again
    scheduler.submit(req("r2", 500, arrival_s=0.07), 0.07)
    assert scheduler.next_deadline() > 0.07
    assert scheduler.closed_at_once()["engine_aligned"] == 1


def test_a_window_is_held_only_when_company_is_expected():
    view, _ = two_busy_instances()
    scheduler = make_scheduler(view, WINDOW.model_copy(update={"hold_min_arrivals": 1.0, "step_aligned_close": None}))
    # the window lasts 0.05 s (half the assumed 0.1 s step); arrivals 0.2 s apart expect a quarter of a request
    for i in range(5):
        now = 0.2 * i
        scheduler.submit(req(f"sparse{i}", 500, arrival_s=now), now)
        assert scheduler.next_deadline() == pytest.approx(now)
        assert scheduler.poll(now) is not None
    assert scheduler.closed_at_once()["alone"] == 5
    # a burst: gaps of 1 ms pull the mean gap below the window's length, and the window holds again
    now = 1.0
    while scheduler.next_deadline() is None or scheduler.next_deadline() == pytest.approx(now):
        scheduler.poll(now)
        now += 0.001
        scheduler.submit(req(f"burst{now:.3f}", 500, arrival_s=now), now)
    assert scheduler.next_deadline() == pytest.approx(scheduler.window.next_tick(now))
    assert scheduler.window.expected_arrivals() >= 1.0


def test_immediate_policies_have_no_window_to_close():
    scheduler = Scheduler("least_tokens", make_view(), window=WINDOW, allocator=PhaseAwareConfig(), decode=None)
    scheduler.set_prefill_alignment("e", True)
    assert scheduler.closed_at_once() == {} and scheduler.prefill_aligned_engines == {"e"}


def test_declared_alignment_reaches_the_scheduler():
    engines = [
        EngineConfig(name="s", flavor="sglang", url="http://127.0.0.1:1", models=[MODEL], prefill_alignment=alignment)
        for alignment in ("prefill_delayer",)
    ] + [
        EngineConfig(name=f"v{i}", flavor="vllm", url="http://127.0.0.1:1", models=[MODEL], prefill_alignment=a)
        for i, a in enumerate(("prefill_schedule_interval", "none", "auto"))
    ]
    d = Dispatcher(Settings(policy="sbs", engines=engines), make_view("s", "v0", "v1", "v2"), GatewayMetrics())
    assert d.scheduler.prefill_aligned_engines == {"s", "v0"}
