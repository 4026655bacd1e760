"""The front door's side of the scheduler service: the progress buffer (coalesced events leave the service's
scheduler as every chunk would), and :class:`RemoteDispatcher`'s fallback and recovery against a fake service."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import pytest

from gateway.config import (
    EngineConfig,
    HealthConfig,
    SchedulerServiceConfig,
    Settings,
    WaterFillConfig,
    WindowConfig,
)
from gateway.dispatch import Dispatcher, Placement
from gateway.errors import OverloadedError
from gateway.load.health import HealthBook
from gateway.load.view import EngineSpec, LoadView
from gateway.scheduler_service.client import ServiceClient, ServiceUnavailable
from gateway.scheduler_service.protocol import (
    ProgressBuffer,
    apply_progress,
    encode_placement,
    event_times,
)
from gateway.scheduler_service.remote import RemoteDispatcher
from gateway.telemetry import GatewayMetrics
from gateway.types import RankKey
from tests import helpers
from tests.helpers import MODEL, req

ENGINES = ("a", "b")
SERVICE = SchedulerServiceConfig(url="unix:/nonexistent.sock", probe_interval_s=0.001, probe_max_interval_s=0.004)


def settings(policy: str = "round_robin", service: SchedulerServiceConfig | None = SERVICE) -> Settings:
    return Settings(
        policy=policy,
        window=WindowConfig(min_interval_s=0.001, max_interval_s=0.01, initial_step_s=0.01),
        allocator=WaterFillConfig(),
        engines=[
            EngineConfig(name=name, flavor="vllm", url="http://127.0.0.1:1", dp_size=4, models=[MODEL])
            for name in ENGINES
        ],
        scheduler_service=service,
    )


# -- the progress buffer -----------------------------------------------------------------------------------


def chunk_stream(seed: int) -> list[tuple[float, str, str, str, int]]:
    """``(time, kind, request, engine, n)`` for 8 requests on two engines: a first token, then chunks in bursts
    (one per step, every 20-40 ms), chunks inside a burst 0.2-1.5 ms apart, some bursts longer than the clock's
    5 ms gap (so they must stay chained), then the finish."""
    rng = random.Random(seed)
    out: list[tuple[float, str, str, str, int]] = []
    for engine in ENGINES:
        t = 0.01
        started: set[str] = set()
        requests = [f"{engine}{i}" for i in range(4)]
        for step in range(30):
            t += rng.uniform(0.02, 0.04)
            chunk_t = t
            for request_id in requests:
                for _ in range(rng.choice((1, 1, 2, 6))):
                    chunk_t += rng.uniform(0.0002, 0.0015)
                    if request_id not in started:
                        started.add(request_id)
                        out.append((chunk_t, "f", request_id, engine, 1))
                    else:
                        out.append((chunk_t, "t", request_id, engine, rng.randint(1, 3)))
            if step == 25:
                out.append((chunk_t + 0.0001, "e", requests[0], engine, 0))
    return sorted(out)


def place_all(dispatcher: Dispatcher) -> None:
    for engine in ENGINES:
        for i in range(4):
            dispatcher.adopt(req(f"{engine}{i}", 3000 + 500 * i), Placement(RankKey(engine, i)), 0.0)


def scheduler_state(dispatcher: Dispatcher) -> dict[str, Any]:
    scheduler = dispatcher.scheduler
    return {
        "models": scheduler.step_models(),
        "step_tokens": dict(scheduler.step_clock.current_step_tokens),
        "ranks": [
            (r.key, r.running, r.waiting, r.kv_tokens, r.queued_prefill_tokens) for r in dispatcher.view.snapshot(9.0)
        ],
    }


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_coalesced_progress_leaves_the_scheduler_as_every_chunk_would(seed: int) -> None:
    """The service's scheduler fed the buffer's batches (taken every 2 ms, dated by their ages) ends in the state
    of one fed every chunk: same step-time models, step figures and per-rank loads; and fewer events travel."""
    every = Dispatcher(settings(service=None), helpers.make_view(*ENGINES, dp_size=4), GatewayMetrics())
    batched = Dispatcher(settings(service=None), helpers.make_view(*ENGINES, dp_size=4), GatewayMetrics())
    place_all(every)
    place_all(batched)
    buffer = ProgressBuffer(every.scheduler.step_clock.boundary_gap_s)
    stream = chunk_stream(seed)
    sent = 0
    last = float("-inf")
    flush_at = 0.002

    def flush(now: float) -> None:
        nonlocal sent, last
        events = buffer.take(now)
        sent += len(events)
        times = event_times(events, now, last)
        for event, when in zip(events, times, strict=True):
            apply_progress(batched, event, when, frozenset(ENGINES))
        if times:
            last = times[-1]

    for t, kind, request_id, engine, n in stream:
        while flush_at <= t:
            flush(flush_at)
            flush_at += 0.002
        if kind == "f":
            every.first_token(request_id, engine, t)
            buffer.first_token(request_id, engine, t)
        elif kind == "t":
            every.tokens(request_id, engine, n, t)
            buffer.tokens(request_id, engine, n, t)
        else:
            every.finish(request_id, t)
            buffer.finish(request_id, t)
    flush(flush_at)
    assert scheduler_state(batched) == scheduler_state(every)
    assert sent < len(stream) * 0.6


def test_event_times_never_go_back() -> None:
    events = [["t", 0.005, "a", {}], ["t", 0.009, "a", {}], ["e", -1.0, "x"]]
    assert event_times(events, 10.0, 9.994) == [9.995, 9.995, 10.0]


# -- the remote dispatcher against a fake service ----------------------------------------------------------


def unwired(event: list[Any]) -> list[Any]:
    """``event`` with its request ids as the front door knows them (without the front door's prefix)."""
    out = list(event)
    if out[0] in ("f", "e", "c"):
        out[2] = out[2].split(":", 1)[1]
    elif out[0] == "t":
        out[3] = {k.split(":", 1)[1]: n for k, n in out[3].items()}
    elif out[0] == "p":
        out[2] = {**out[2], "id": out[2]["id"].split(":", 1)[1]}
    return out


class FakeService(ServiceClient):
    """A scheduler service in memory: places on the rank it is told, records events (posted or riding along with a
    placement), fails when told."""

    def __init__(self) -> None:
        super().__init__(SERVICE)
        self.epoch = "e1"
        self.down = False
        self.hold: asyncio.Event | None = None
        self.rank = RankKey("b", 3)
        self.answer: dict[str, Any] | None = None
        self.placed: list[str] = []
        self.events: list[list[Any]] = []
        self.wire_ids: list[str] = []
        """The request ids as sent (prefixed with the front door's id)."""
        self.callers: list[str | None] = []
        """The front-door id of every call, in order."""

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def place(self, body: dict[str, Any], wait_s: float) -> dict[str, Any]:
        if self.down:
            raise ServiceUnavailable("connection refused")
        self.callers.append(body.get("front_door"))
        if body.get("epoch") == self.epoch:  # the events owed ride along
            self.events.extend(unwired(e) for e in body.get("events", []))
        if self.hold is not None:
            await self.hold.wait()
        self.wire_ids.append(body["request"]["id"])
        self.placed.append(body["request"]["id"].split(":", 1)[1])
        return self.answer or encode_placement(Placement(self.rank), self.epoch)

    async def post_events(self, epoch: str, events: list[Any], front_door: str | None = None) -> str | None:
        if self.down:
            raise ServiceUnavailable("connection refused")
        self.callers.append(front_door)
        if epoch != self.epoch:
            return self.epoch
        self.events.extend(unwired(e) for e in events)
        return None

    async def health(self, front_door: str | None = None) -> str:
        if self.down:
            raise ServiceUnavailable("connection refused")
        self.callers.append(front_door)
        return self.epoch


async def remote(
    policy: str = "round_robin", service: SchedulerServiceConfig = SERVICE, health: HealthBook | None = None
) -> tuple[RemoteDispatcher, FakeService]:
    fake = FakeService()
    dispatcher = RemoteDispatcher(
        settings(policy, service),
        helpers.make_view(*ENGINES, dp_size=4),
        GatewayMetrics(),
        health,
        clock=lambda: 0.0,
        client=fake,
    )
    await dispatcher.start()
    return dispatcher, fake


async def until(condition: Any) -> None:
    """Let the event loop run until ``condition()`` holds."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the condition never held")


def kinds(fake: FakeService) -> list[tuple[str, str]]:
    return [(e[0], e[2] if e[0] != "t" else next(iter(e[3]))) for e in fake.events]


def metric(dispatcher: RemoteDispatcher, name: str) -> float:
    return helpers.total(dispatcher.metrics.render().decode(), name)


async def test_places_through_the_service_and_reports_progress() -> None:
    dispatcher, fake = await remote()
    try:
        placement = await dispatcher.acquire(req("r1", 100))
        assert placement == Placement(RankKey("b", 3))
        assert fake.placed == ["r1"] and dispatcher.view.rank_of("r1") == RankKey("b", 3)  # counted here too
        dispatcher.first_token("r1", "b")
        dispatcher.tokens("r1", "b", 4)
        dispatcher.finish("r1")
        await until(lambda: len(fake.events) == 3)
        assert kinds(fake) == [("f", "r1"), ("t", "r1"), ("e", "r1")]
        assert dispatcher.view.inflight_count() == 0
        assert metric(dispatcher, "gateway_scheduler_service_mode") == 1
    finally:
        await dispatcher.stop()


async def test_falls_back_at_once_then_recovers(caplog: pytest.LogCaptureFixture) -> None:
    dispatcher, fake = await remote()
    try:
        await dispatcher.acquire(req("r1", 100))  # placed by the service, run e1
        fake.down = True
        with caplog.at_level(logging.WARNING, logger="gateway.scheduler_service.remote"):
            local = await dispatcher.acquire(req("r2", 100))
            await dispatcher.acquire(req("r3", 100))
            assert not dispatcher.remote and fake.placed == ["r1"]
            assert local.rank != RankKey("b", 3) or dispatcher.view.rank_of("r2") == local.rank
            assert metric(dispatcher, "gateway_scheduler_service_fallbacks_total") == 1
            assert metric(dispatcher, "gateway_scheduler_service_replaced_total") == 1
            assert metric(dispatcher, "gateway_scheduler_service_mode") == 0
            fake.epoch = "e2"  # the service restarts
            fake.down = False
            await until(lambda: dispatcher.remote)
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 2 and "placing requests locally" in lines[0] and "answers again (epoch e2)" in lines[1]
        assert metric(dispatcher, "gateway_scheduler_service_mode") == 1
        dispatcher.finish("r1")  # placed by run e1: nothing for e2
        dispatcher.finish("r2")  # placed locally: nothing either
        await dispatcher.acquire(req("r4", 100))
        dispatcher.finish("r4")
        await until(lambda: fake.events)
        assert fake.placed == ["r1", "r4"] and kinds(fake) == [("e", "r4")]
    finally:
        await dispatcher.stop()


async def test_a_request_waiting_for_a_dead_service_is_placed_locally() -> None:
    dispatcher, fake = await remote("sbs")
    fake.hold = asyncio.Event()  # the service holds r1 in its window
    try:
        waiting = asyncio.create_task(dispatcher.acquire(req("r1", 100)))
        await until(lambda: "r1" in dispatcher._asking)
        fake.down = True
        dispatcher.fall_back("an events post failed")  # as the flusher does when its post fails
        placement = await waiting
        assert dispatcher.view.rank_of("r1") == placement.rank
        assert metric(dispatcher, "gateway_scheduler_service_replaced_total") == 1
    finally:
        await dispatcher.stop()


async def test_the_services_refusal_is_the_clients_answer_not_a_fallback() -> None:
    dispatcher, fake = await remote()
    fake.answer = {"error": {"kind": "overloaded", "code": "window_full", "message": "the window is full"}}
    try:
        with pytest.raises(OverloadedError) as caught:
            await dispatcher.acquire(req("r1", 100))
        assert caught.value.code == "window_full" and dispatcher.remote
    finally:
        await dispatcher.stop()


async def test_a_client_gone_while_waiting_is_cancelled_at_the_service() -> None:
    dispatcher, fake = await remote("sbs")
    try:
        await dispatcher.acquire(req("r0", 100))  # learns the service's epoch
        fake.hold = asyncio.Event()
        waiting = asyncio.create_task(dispatcher.acquire(req("r1", 100)))
        await until(lambda: "r1" in dispatcher._asking)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await until(lambda: fake.events)
        assert kinds(fake) == [("c", "r1")] and dispatcher.remote
    finally:
        await dispatcher.stop()


async def test_a_retry_is_placed_locally_and_the_service_told() -> None:
    dispatcher, fake = await remote()
    try:
        await dispatcher.acquire(req("r1", 100))
        dispatcher.finish("r1")
        placement = dispatcher.retry_placement(req("r1", 100), {RankKey("b", 3)})
        assert placement.rank.engine == "a"
        await until(lambda: len(fake.events) == 2)
        assert [e[0] for e in fake.events] == ["e", "p"] and fake.events[1][2]["id"] == "r1"
        assert fake.events[1][3] == [placement.rank.engine, placement.rank.rank]
    finally:
        await dispatcher.stop()


async def test_events_owed_ride_along_with_the_next_placement() -> None:
    dispatcher, fake = await remote()
    try:
        await dispatcher.acquire(req("r1", 100))
        dispatcher.first_token("r1", "b")
        await dispatcher.acquire(req("r2", 100))  # before the events sender's turn: r1's first token goes with it
        assert kinds(fake) == [("f", "r1")] and len(dispatcher.buffer) == 0
    finally:
        await dispatcher.stop()


async def test_a_slow_service_is_told_to_drop_what_the_front_door_placed_itself() -> None:
    dispatcher, fake = await remote("sbs")
    fake.hold = asyncio.Event()  # the service holds r1 past the front door's patience
    try:
        waiting = asyncio.create_task(dispatcher.acquire(req("r1", 100)))
        await until(lambda: "r1" in dispatcher._asking)
        fake.down = True
        dispatcher.fall_back("no answer within 50 ms")
        placement = await waiting
        assert dispatcher.view.rank_of("r1") == placement.rank
        fake.down = False  # the same run answers again
        await until(lambda: dispatcher.remote)
        await until(lambda: fake.events)
        assert kinds(fake) == [("c", "r1")]
    finally:
        await dispatcher.stop()


async def test_a_service_down_at_start_means_local_placement_at_once() -> None:
    fake = FakeService()
    fake.down = True
    dispatcher = RemoteDispatcher(
        settings(), helpers.make_view(*ENGINES, dp_size=4), GatewayMetrics(), clock=lambda: 0.0, client=fake
    )
    await dispatcher.start()
    try:
        assert not dispatcher.remote
        await dispatcher.acquire(req("r1", 100))
        assert fake.placed == []
        fake.down = False
        await until(lambda: dispatcher.remote)
        await dispatcher.acquire(req("r2", 100))
        assert fake.placed == ["r2"]
    finally:
        await dispatcher.stop()


async def test_a_pd_placement_counts_both_legs_here_too() -> None:
    fake = FakeService()
    fake.answer = encode_placement(Placement(RankKey("p", 1), 3, RankKey("d", 2)), fake.epoch)
    engines = [
        EngineConfig(name=name, flavor="sglang", role=role, url="http://127.0.0.1:1", dp_size=4, models=[MODEL])
        for name, role in (("p", "prefill"), ("d", "decode"))
    ]
    pd_settings = settings().model_copy(update={"engines": engines})
    view = LoadView(
        [EngineSpec(e.name, e.dp_size, frozenset(e.models), 8192, e.role) for e in engines], stale_after_s=3.0
    )
    dispatcher = RemoteDispatcher(pd_settings, view, GatewayMetrics(), clock=lambda: 0.0, client=fake)
    await dispatcher.start()
    try:
        placement = await dispatcher.acquire(req("r1", 100))
        assert placement == Placement(RankKey("p", 1), 3, RankKey("d", 2))
        assert view.decode_rank_of("r1") == RankKey("d", 2) and view.rank_of("r1") == RankKey("d", 2)
        dispatcher.finish("r1")
        assert view.inflight_count() == 0
    finally:
        await dispatcher.stop()


# -- the front door's id, heartbeat and request outcomes ---------------------------------------------------


async def test_every_call_names_the_front_door_and_an_idle_one_sends_heartbeats() -> None:
    """Placements, events and health calls carry the front door's id; with nothing to send for ``heartbeat_s`` it
    calls ``/v1/health`` with its id; after a fallback it takes a new id (the service expires the old one's)."""
    quick = SERVICE.model_copy(update={"heartbeat_s": 0.002, "front_door_expiry_s": 0.05})
    dispatcher, fake = await remote(service=quick)
    try:
        first = dispatcher.front_door
        await dispatcher.acquire(req("r1", 100))
        dispatcher.finish("r1")
        await until(lambda: len(fake.callers) >= 6)  # start's health, the placement, the events, heartbeats
        assert set(fake.callers) == {first}
        fake.down = True
        dispatcher.fall_back("connection refused")
        fake.down = False
        await until(lambda: dispatcher.remote)
        assert dispatcher.front_door != first and fake.callers[-1] == dispatcher.front_door
    finally:
        await dispatcher.stop()


async def test_request_outcomes_on_ranks_reach_the_service() -> None:
    """A failure the front door's circuit breakers record goes to the service at once; successes go once a batch
    per rank."""
    health = HealthBook([RankKey(e, r) for e in ENGINES for r in range(4)], HealthConfig())
    dispatcher, fake = await remote(health=health)
    try:
        await dispatcher.acquire(req("r1", 100))
        health.record_failure(RankKey("b", 3), "rank", 0.0)
        health.record_failure(RankKey("a", 0), "engine", 0.0)
        await until(lambda: len(fake.events) == 2)
        assert fake.events == [["h", 0.0, ["b", 3], "rank"], ["h", 0.0, ["a", 0], "engine"]]
        for _ in range(3):
            health.record_success(RankKey("b", 3), 0.0)
        health.record_success(RankKey("b", 2), 0.0)
        await until(lambda: len(fake.events) == 4)
        assert [e[2:] for e in fake.events[2:]] == [[["b", 3], None], [["b", 2], None]]
    finally:
        await dispatcher.stop()


def test_outcomes_keep_their_order_and_a_success_after_a_failure_is_sent() -> None:
    buffer = ProgressBuffer(0.005)
    b3 = RankKey("b", 3)
    buffer.outcome(b3, None, 1.0)
    buffer.outcome(b3, "rank", 2.0)
    buffer.outcome(b3, None, 3.0)
    buffer.outcome(b3, None, 4.0)
    assert buffer.urgent
    assert buffer.take(5.0) == [["h", 4.0, ["b", 3], None], ["h", 3.0, ["b", 3], "rank"], ["h", 2.0, ["b", 3], None]]
    buffer.outcome(b3, None, 6.0)  # a new batch: sent again
    assert len(buffer.take(6.0)) == 1


async def test_two_front_doors_send_distinct_request_ids() -> None:
    """Front doors number their requests independently: the service sees each id prefixed by its front door's."""
    first, fake_1 = await remote()
    second, fake_2 = await remote()
    try:
        await first.acquire(req("r0", 100))
        await second.acquire(req("r0", 100))
        assert fake_1.placed == fake_2.placed == ["r0"]
        assert fake_1.wire_ids != fake_2.wire_ids
    finally:
        await first.stop()
        await second.stop()
