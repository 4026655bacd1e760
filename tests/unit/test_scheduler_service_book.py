"""The scheduler service's side of its front doors, in simulated time: a silent front door's requests are released
(:class:`FrontDoorBook`), and the request outcomes front doors forward reach the service's circuit breakers."""

from __future__ import annotations

from gateway.config import EngineConfig, Settings
from gateway.load.health import BreakerState
from gateway.scheduler_service.protocol import encode_rank, encode_request
from gateway.scheduler_service.service import FrontDoorBook, SchedulerService
from gateway.server.app import build_state
from gateway.types import RankKey
from tests.helpers import MODEL, req


def test_the_book_expires_only_front_doors_silent_for_the_expiry() -> None:
    book = FrontDoorBook(expiry_s=30.0)
    book.heard("A", 100.0)
    book.placed("A", "r1")
    book.placed("A", "r2")
    book.heard("B", 100.0)
    book.placed("B", "r3")
    book.ended("r2")
    book.heard("B", 120.0)  # a heartbeat
    assert book.expire(129.9) == {}
    assert book.expire(130.0) == {"A": ["r1"]}
    assert book.requests_of("A") == frozenset() and book.requests_of("B") == {"r3"}
    book.placed("B", "r1")  # r1 retried through B: B's now
    assert book.expire(149.0) == {}
    assert book.expire(150.0) == {"B": ["r1", "r3"]}


def service_settings() -> Settings:
    return Settings(
        policy="round_robin",
        engines=[EngineConfig(name="a", flavor="vllm", url="http://127.0.0.1:1", dp_size=4, models=[MODEL])],
    )


async def test_a_silent_front_doors_requests_leave_the_services_view() -> None:
    """Front door A places r1 and r2 and ends r2, then falls silent; B places r3, tells the service of a retry it
    placed itself (r4), and sends heartbeats. At the expiry A's r1 leaves the view; B's stay until B is silent too."""
    state = build_state(service_settings())
    now = [100.0]
    state.clock = state.dispatcher.clock = lambda: now[0]
    service = SchedulerService(state, expiry_s=30.0)
    try:
        service._heard_from("A")
        assert "rank" in await service._acquire(req("r1", 100), "A")
        assert "rank" in await service._acquire(req("r2", 100), "A")
        service._apply_events([["e", 0.0, "r2"]], "A")
        service._heard_from("B")
        assert "rank" in await service._acquire(req("r3", 100), "B")
        retry = encode_request(req("r4", 100), now[0])
        service._apply_events([["p", 0.0, retry, encode_rank(RankKey("a", 2)), None]], "B")
        view = state.view
        assert {r for r in ("r1", "r2", "r3", "r4") if view.rank_of(r) is not None} == {"r1", "r3", "r4"}
        now[0] = 125.0
        service._heard_from("B")  # B's heartbeat
        now[0] = 130.0
        assert service.expire_front_doors(now[0]) == 1
        assert view.rank_of("r1") is None and view.rank_of("r3") is not None and view.rank_of("r4") is not None
        now[0] = 154.0
        assert service.expire_front_doors(now[0]) == 0
        now[0] = 155.0
        assert service.expire_front_doors(now[0]) == 2
        assert view.inflight_count() == 0
    finally:
        await state.client.aclose()


async def test_forwarded_failures_open_the_services_breaker_and_a_success_closes_it() -> None:
    state = build_state(service_settings())
    now = [100.0]
    state.clock = state.dispatcher.clock = lambda: now[0]
    service = SchedulerService(state)
    a1 = RankKey("a", 1)
    try:
        service._apply_events([["h", 0.0, ["a", 1], None]], "A")  # a success: the rank has served
        threshold = state.settings.health.failure_threshold
        service._apply_events([["h", 0.0, ["a", 1], "rank"]] * threshold, "A")
        assert state.health.rank(a1).state(now[0]) is BreakerState.OPEN
        placed = [(await service._acquire(req(f"r{i}", 100), "B"))["rank"] for i in range(8)]
        assert ["a", 1] not in placed
        now[0] += state.settings.health.open_s
        service._apply_events([["h", 0.0, ["a", 1], None]], "B")  # the half-open trial succeeded
        assert state.health.rank(a1).state(now[0]) is BreakerState.CLOSED
        service._apply_events([["h", 0.0, ["z", 9], "rank"], ["h", 0.0, ["a", 1], "bogus"]], "A")  # dropped
        assert state.health.rank(a1).state(now[0]) is BreakerState.CLOSED
    finally:
        await state.client.aclose()
