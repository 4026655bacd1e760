"""Circuit breakers (pure, time passed in), the queueing deadline and retry placement in the dispatcher."""

from __future__ import annotations

import asyncio

import pytest

from gateway.config import EngineConfig, HealthConfig, Settings, WindowConfig
from gateway.dispatch import Dispatcher
from gateway.errors import NoCapacityError, OverloadedError
from gateway.load.health import BreakerState, CircuitBreaker, HealthBook, RetryThrottle
from gateway.telemetry import GatewayMetrics
from gateway.types import RankKey
from tests.helpers import MODEL, make_view, req, total

CONFIG = HealthConfig(failure_threshold=3, open_s=1.0, max_open_s=4.0)


def breaker(*, trial_by_request: bool = True) -> CircuitBreaker:
    b = CircuitBreaker(3, 1.0, 4.0, trial_by_request)
    b.record_success(0.0)  # seen healthy once
    return b


def test_breaker_opens_after_consecutive_failures_only() -> None:
    b = breaker()
    b.record_failure(0.0)
    b.record_failure(0.1)
    b.record_success(0.2)  # resets the count
    b.record_failure(0.3)
    b.record_failure(0.4)
    assert b.state(0.4) is BreakerState.CLOSED and b.allows(0.4)
    b.record_failure(0.5)
    assert b.state(0.5) is BreakerState.OPEN and not b.allows(1.4)
    assert b.state(1.5) is BreakerState.HALF_OPEN


def test_half_open_lets_one_trial_through_and_doubles_the_wait_when_it_fails() -> None:
    b = breaker()
    for t in (0.0, 0.1, 0.2):
        b.record_failure(t)
    assert b.allows(1.2)
    b.on_dispatch(1.2)
    assert not b.allows(1.3), "only one trial at a time"
    b.record_failure(1.4)
    assert b.state(1.4) is BreakerState.OPEN and b.open_until == pytest.approx(3.4)
    b.on_dispatch(3.5)
    b.record_failure(3.6)
    assert b.open_until == pytest.approx(3.6 + 4.0), "capped at max_open_s"
    b.on_dispatch(7.7)
    b.record_success(7.8)
    assert b.state(7.8) is BreakerState.CLOSED and b.allows(7.8)


def test_success_while_open_does_not_cut_the_wait_short() -> None:
    b = breaker()
    for t in (0.0, 0.1, 0.2):
        b.record_failure(t)
    b.record_success(0.5)
    assert b.state(0.5) is BreakerState.OPEN


def test_a_breaker_never_seen_healthy_opens_on_its_first_failure() -> None:
    b = CircuitBreaker(3, 1.0, 4.0)
    b.record_failure(0.0)
    assert b.state(0.0) is BreakerState.OPEN


def test_an_engine_breaker_is_closed_by_probes_not_by_requests() -> None:
    b = breaker(trial_by_request=False)
    for t in (0.0, 0.1, 0.2):
        b.record_failure(t)
    assert not b.allows(1.5), "half-open, but requests wait for the probe"
    b.record_success(1.5)
    assert b.allows(1.5)


def test_health_book_engine_failures_take_every_rank_out_rank_failures_one() -> None:
    keys = [RankKey("a", r) for r in range(2)] + [RankKey("b", r) for r in range(2)]
    book = HealthBook(keys, CONFIG)
    for key in keys:
        book.record_success(key, 0.0)
    for t in (0.0, 0.1, 0.2):
        book.record_failure(RankKey("a", 0), "engine", t)
        book.record_failure(RankKey("b", 1), "rank", t)
    usable = [k for k in keys if book.usable(k, 0.3)]
    assert usable == [RankKey("b", 0)]
    assert not book.engine_up("a", 0.3) and book.engine_up("b", 0.3)
    assert book.describe(0.3) == {
        "a": {"state": "open", "unhealthy_ranks": []},
        "b": {"state": "closed", "unhealthy_ranks": [1]},
    }
    with pytest.raises(ValueError, match="scope"):
        book.record_failure(keys[0], "cluster", 0.0)


def make_dispatcher(window: WindowConfig, clock: list[float]) -> Dispatcher:
    engines = [
        EngineConfig(name=name, flavor="vllm", url="http://127.0.0.1:1", dp_size=2, models=[MODEL])
        for name in ("a", "b")
    ]
    settings = Settings(policy="sbs", window=window, engines=engines)
    view = make_view(*(e.name for e in engines), dp_size=2)
    return Dispatcher(settings, view, GatewayMetrics(), clock=lambda: clock[0])


async def test_a_request_buffered_past_its_queueing_deadline_gets_503_and_leaves_the_window() -> None:
    clock = [0.0]  # frozen: the window never closes
    d = make_dispatcher(WindowConfig(queue_timeout_s=0.05), clock)
    with pytest.raises(OverloadedError) as info:
        await d.acquire(req("late", 100))
    assert info.value.code == "queue_timeout" and info.value.retry_after_s == 1
    assert len(d.scheduler.window) == 0 and d.view.inflight_count() == 0
    assert total(d.metrics.render().decode(), "gateway_rejected_requests_total", reason="queue_deadline") == 1


async def test_a_request_placed_just_as_its_deadline_passes_is_released() -> None:
    clock = [0.0]
    d = make_dispatcher(WindowConfig(queue_timeout_s=0.05), clock)
    task = asyncio.create_task(d.acquire(req("edge", 100)))
    await asyncio.sleep(0)
    clock[0] = 1.0
    assert d.close_window_if_due()  # placed: the future has its result, the task has not resumed yet
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert d.view.inflight_count() == 0, "the placement must be released, not leaked"


def test_a_retry_goes_to_another_engine_when_one_serves_the_model() -> None:
    d = make_dispatcher(WindowConfig(), [0.0])
    key = d.place_retry(req("r", 10), {RankKey("a", 0)})
    assert key.engine == "b"
    d.finish("r")
    key = d.place_retry(req("r", 10), {RankKey("a", 0), RankKey("b", 0), RankKey("b", 1)})
    assert key == RankKey("a", 1), "same engine, other rank, when no other engine is left"
    d.finish("r")
    with pytest.raises(NoCapacityError):
        d.place_retry(req("r", 10), {RankKey(e, r) for e in "ab" for r in range(2)})


def test_retry_throttling_stops_retries_while_most_tries_fail_and_recovers_with_successes() -> None:
    throttle = RetryThrottle(max_tokens=10, ratio=0.5)
    for _ in range(4):
        throttle.on_failure()
    assert throttle.allows_retry(), "6 of 10 tokens left"
    throttle.on_failure()
    assert not throttle.allows_retry(), "5 left: not more than half"
    throttle.on_success()
    assert throttle.allows_retry()
    for _ in range(100):
        throttle.on_success()
    assert throttle.tokens == 10, "capped at the maximum"
