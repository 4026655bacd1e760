"""Two front doors sharing a scheduler service (in process, over loopback HTTP): a rank failing through front door A
stops receiving placements from the service for front door B (A's circuit breakers forward the failures)."""

from __future__ import annotations

from aiohttp.test_utils import TestServer

from gateway.config import EngineConfig, SchedulerServiceConfig, Settings
from gateway.load.health import BreakerState, HealthBook
from gateway.scheduler_service.remote import RemoteDispatcher
from gateway.scheduler_service.service import SchedulerService
from gateway.server.app import build_state
from gateway.telemetry import GatewayMetrics
from gateway.types import RankKey
from tests import helpers
from tests.helpers import MODEL, eventually, req


def settings(service: SchedulerServiceConfig | None = None) -> Settings:
    return Settings(
        policy="round_robin",
        engines=[
            EngineConfig(name=name, flavor="vllm", url="http://127.0.0.1:1", dp_size=2, models=[MODEL])
            for name in ("a", "b")
        ],
        scheduler_service=service,
    )


def front_door(config: SchedulerServiceConfig) -> tuple[RemoteDispatcher, HealthBook]:
    ranks = [RankKey(e, r) for e in ("a", "b") for r in range(2)]
    health = HealthBook(ranks, settings().health)
    view = helpers.make_view("a", "b", dp_size=2)
    return RemoteDispatcher(settings(config), view, GatewayMetrics(), health), health


async def test_a_rank_failing_through_one_front_door_is_avoided_for_the_other() -> None:
    state = build_state(settings())  # the service's state; its scrapers and probers are not started
    service = SchedulerService(state)
    server = TestServer(service.application(), host="127.0.0.1")
    await server.start_server()
    config = SchedulerServiceConfig(url=f"http://127.0.0.1:{server.port}", deadline_s=5.0)
    door_a, health_a = front_door(config)
    door_b, _ = front_door(config)
    await door_a.start()
    await door_b.start()
    failing = RankKey("a", 1)
    try:
        before = [(await door_b.acquire(req(f"b{i}", 100))).rank for i in range(4)]
        assert failing in before  # round robin reaches every rank
        for i in range(4):
            door_b.finish(f"b{i}")
        for _ in range(settings().health.failure_threshold):
            health_a.record_failure(failing, "rank", door_a.clock())  # as gateway.server.retry.record_failure does

        async def opened() -> bool:
            return state.health.rank(failing).state(state.clock()) is BreakerState.OPEN

        await eventually(opened, timeout_s=10)
        after = [(await door_b.acquire(req(f"c{i}", 100))).rank for i in range(8)]
        assert failing not in after and len(set(after)) == 3
        assert door_a.remote and door_b.remote  # through the service all along
    finally:
        await door_a.stop()
        await door_b.stop()
        await server.close()
        await state.client.aclose()
