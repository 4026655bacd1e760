"""The scheduler service: one process holding the window, the allocator, the load view and the engine scrapers and
probers, which front doors consult per request (``gateway scheduler``; ``gateway serve --workers N`` starts one).

It is an aiohttp application (HTTP/1.1 keep-alive, JSON; over TCP or a Unix socket) around the same
:class:`~gateway.dispatch.Dispatcher` a single-process gateway runs, built by the same
:func:`~gateway.server.app.build_state`:

- ``POST /v1/place`` ``{"request": ..., "epoch", "events": [...]}`` (the events the front door owes ride along,
  applied first, as ``/v1/events`` would): answers ``{"rank", "window_id", "decode_rank", "epoch"}`` once the
  request is placed, or ``{"error": {"kind", "code", "message"}}`` (no rank serves the model, the window is full, the
  request waited past its queue timeout). With ``sbs`` the headers go out at once and the body when the window
  closes, so a front door tells a live service holding a request from a dead one by the headers' arrival.
- ``POST /v1/events`` ``{"epoch", "events": [...]}``: the progress of requests it placed
  (:mod:`gateway.scheduler_service.protocol`); 204, or 409 with the service's epoch when the front door's events
  are for an earlier run of the service (they are dropped: that run's view is gone).
- ``PUT /v1/responses/{id}`` ``{"engine", "rank", "model"}``: a front door relayed a stored Response produced on
  that rank (204); ``GET /v1/responses/{id}``: where it lives, ``{"engine", "rank", "model"}``, or 404. Every front
  door shares the one map (:class:`~gateway.server.responses_store.ResponseHomes` of the service's state, with the
  same ``responses.*`` bounds), so a follow-up may reach any of them (:mod:`gateway.server.responses`).
- ``GET /v1/health``: ``{"epoch", "policy"}``; ``GET /metrics``: its Prometheus metrics (the window's, the ranks'
  loads as it sees them).

Each front door names itself (``"front_door"`` in the bodies, ``?front_door=`` on the health probe): the service
keeps which requests each one placed (:class:`FrontDoorBook`) and releases them when it has not heard from that
front door for ``scheduler_service.front_door_expiry_s`` (a dead front door's requests would otherwise stay counted:
a scrape corrects the ranks' load figures, not the service's per-request accounting). A live but idle front door
sends a heartbeat (the health probe).

The epoch is a random id drawn at start: a restarted service rebuilds its view from its first scrapes, and front
doors drop the events of requests the previous run placed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from gateway.config import SchedulerServiceConfig, Settings
from gateway.errors import GatewayError, NoCapacityError, OverloadedError
from gateway.scheduler_service.protocol import (
    apply_progress,
    decode_rank,
    decode_request,
    encode_placement,
    event_times,
)
from gateway.server.app import build_state
from gateway.server.state import GatewayState
from gateway.types import PendingRequest, RankKey

log = logging.getLogger(__name__)

CANCELLED_REMEMBERED = 4096
"""Cancellations of requests not (yet) asked for that the service remembers, so a placement asked for after its
cancellation (the two travel on different connections) is refused rather than leaked."""

_JSON = "application/json"

DEFAULT_EXPIRY_S = SchedulerServiceConfig.model_fields["front_door_expiry_s"].default
"""The front-door expiry of a service whose configuration has no ``scheduler_service`` section."""


class FrontDoorBook:
    """Which requests each front door placed through the service, and when the service last heard from it (pure:
    time passed in).

    Args:
        expiry_s: a front door not heard from for this long, seconds, is expired (:meth:`expire`).
    """

    def __init__(self, expiry_s: float) -> None:
        self.expiry_s = expiry_s
        self._heard: dict[str, float] = {}
        self._requests: dict[str, set[str]] = {}
        self._owner: dict[str, str] = {}

    def heard(self, front_door: str, now: float) -> None:
        """A call from ``front_door`` arrived at ``now``."""
        self._heard[front_door] = now
        self._requests.setdefault(front_door, set())

    def placed(self, front_door: str, request_id: str) -> None:
        """``front_door`` placed ``request_id`` through the service (or told it of its own retry's placement)."""
        self.ended(request_id)
        self._requests.setdefault(front_door, set()).add(request_id)
        self._owner[request_id] = front_door

    def ended(self, request_id: str) -> None:
        """``request_id`` ended (or was cancelled): no front door owns it any more."""
        front_door = self._owner.pop(request_id, None)
        if front_door is not None:
            self._requests[front_door].discard(request_id)

    def requests_of(self, front_door: str) -> frozenset[str]:
        """The requests ``front_door`` placed that have not ended."""
        return frozenset(self._requests.get(front_door, ()))

    def expire(self, now: float) -> dict[str, list[str]]:
        """Forget every front door not heard from since ``now - expiry_s``; return each one's requests still in
        flight (for the caller to release)."""
        gone = [front_door for front_door, heard in self._heard.items() if now - heard >= self.expiry_s]
        out: dict[str, list[str]] = {}
        for front_door in gone:
            del self._heard[front_door]
            requests = self._requests.pop(front_door, set())
            for request_id in requests:
                self._owner.pop(request_id, None)
            out[front_door] = sorted(requests)
        return out


def error_answer(exc: GatewayError) -> dict[str, Any]:
    """The body of a placement the service refuses with ``exc``."""
    kind = "overloaded" if isinstance(exc, OverloadedError) else "no_capacity"
    return {"error": {"kind": kind, "code": exc.code, "message": exc.message}}


class SchedulerService:
    """The routes of the service around one running gateway state (its dispatcher, view, scraper, prober).

    Args:
        state: the scheduling state (:func:`~gateway.server.app.build_state`), started by the caller.
        expiry_s: release a front door's requests when not heard from it for this long, seconds.
    """

    def __init__(self, state: GatewayState, expiry_s: float = DEFAULT_EXPIRY_S) -> None:
        self.state = state
        self.front_doors = FrontDoorBook(expiry_s)
        self.dispatcher = state.dispatcher
        self.epoch = uuid.uuid4().hex[:16]
        self._waiting: dict[str, asyncio.Task[Any]] = {}
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        self._cancelling: set[str] = set()
        self._last_event_s = -math.inf
        self._engines = state.engines  # live: the engine set changes it in place

    def application(self) -> web.Application:
        """The aiohttp application serving the routes."""
        app = web.Application()
        app.router.add_post("/v1/place", self.place)
        app.router.add_post("/v1/events", self.events)
        app.router.add_put("/v1/responses/{response_id}", self.remember_response)
        app.router.add_get("/v1/responses/{response_id}", self.response_home)
        app.router.add_get("/v1/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def place(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/place``: place one request."""
        try:
            body = await request.json()
            pending = decode_request(body["request"], self.state.clock())
        except (KeyError, TypeError, ValueError) as exc:
            return web.json_response({"error": {"kind": "bad_request", "message": str(exc)}}, status=400)
        front_door = self._heard_from(body.get("front_door"))
        events = body.get("events")
        if events and body.get("epoch") == self.epoch:
            self._apply_events(events, front_door)
        if pending.request_id in self._cancelled:
            del self._cancelled[pending.request_id]
            return web.json_response(error_answer(NoCapacityError("the client went away")))
        if not self.dispatcher.scheduler.batched:
            return web.json_response(await self._acquire(pending, front_door))
        response = web.StreamResponse(headers={"Content-Type": _JSON})
        await response.prepare(request)  # the headers tell the front door the service is alive
        answer = await self._acquire(pending, front_door)
        try:
            await response.write(json.dumps(answer).encode())
            await response.write_eof()
        except (ConnectionError, RuntimeError):  # the front door went away: nobody will run the request
            if "rank" in answer:
                self._end(pending.request_id, self.state.clock())
        return response

    def _heard_from(self, front_door: Any) -> str | None:
        """Note a call from ``front_door`` (its id as sent, or ``None`` for a caller that gives none)."""
        if not isinstance(front_door, str):
            return None
        self.front_doors.heard(front_door, self.state.clock())
        return front_door

    def _end(self, request_id: str, when: float) -> None:
        self.dispatcher.finish(request_id, when)
        self.front_doors.ended(request_id)

    def expire_front_doors(self, now: float) -> int:
        """Release the requests of every front door not heard from for ``expiry_s`` (logged); return how many."""
        released = 0
        for front_door, requests in self.front_doors.expire(now).items():
            live = [r for r in requests if self.state.view.rank_of(r) is not None]
            for request_id in live:
                self.dispatcher.finish(request_id, now)
            released += len(live)
            if live:
                log.warning(
                    "scheduler service: front door %s silent for %g s: released its %d requests in flight",
                    front_door,
                    self.front_doors.expiry_s,
                    len(live),
                )
        return released

    async def _expiry_loop(self) -> None:
        """Expire silent front doors, checking four times per ``expiry_s``."""
        while True:
            await asyncio.sleep(self.front_doors.expiry_s / 4)
            self.expire_front_doors(self.state.clock())

    async def _acquire(self, pending: PendingRequest, front_door: str | None) -> dict[str, Any]:
        task = asyncio.current_task()
        assert task is not None
        self._waiting[pending.request_id] = task
        try:
            placement = await self.dispatcher.acquire(pending)
        except GatewayError as exc:
            return error_answer(exc)
        except asyncio.CancelledError:
            if pending.request_id in self._cancelling:  # cancelled by a "c" event, not by the server
                task.uncancel()
                return error_answer(NoCapacityError("the client went away"))
            raise
        finally:
            self._waiting.pop(pending.request_id, None)
            self._cancelling.discard(pending.request_id)
        if front_door is not None:
            self.front_doors.placed(front_door, pending.request_id)
        return encode_placement(placement, self.epoch)

    async def events(self, request: web.Request) -> web.Response:
        """``POST /v1/events``: apply a front door's batch of progress events."""
        body = await request.json()
        front_door = self._heard_from(body.get("front_door"))
        if body.get("epoch") != self.epoch:
            return web.json_response({"epoch": self.epoch}, status=409)
        self._apply_events(body["events"], front_door)
        return web.Response(status=204)

    def _apply_events(self, events: list[Any], front_door: str | None = None) -> None:
        """Apply a batch of events from ``front_door``, dated by their ages at receipt."""
        received = self.state.clock()
        times = event_times(events, received, self._last_event_s)
        changed = False
        for event, when in zip(events, times, strict=True):
            try:
                kind = event[0]
                if kind == "c":
                    self._cancel(str(event[2]), when)
                elif kind == "h":
                    changed = self._outcome(event, when) or changed
                else:
                    apply_progress(self.dispatcher, event, when, self._engines)
                    if kind == "e":
                        self.front_doors.ended(str(event[2]))
                    elif kind == "p" and front_door is not None:
                        self.front_doors.placed(front_door, str(event[2]["id"]))
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                log.warning("scheduler service: dropped a malformed event %r: %s", event[:3], exc)
        if times:
            self._last_event_s = times[-1]
        if changed:  # a breaker opened or closed
            self.state.prober.publish()
            self.dispatcher.notify_load_changed()

    def _outcome(self, event: list[Any], when: float) -> bool:
        """A front door's request outcome on a rank (an ``h`` event), fed to the service's circuit breakers; return
        whether the rank's or its engine's breaker changed state.

        Raises:
            ValueError: an unknown rank or scope.
        """
        key = decode_rank(event[2])
        configured = None if key is None else self._engines.get(key.engine)
        if key is None or configured is None or not 0 <= key.rank < configured.config.dp_size:
            raise ValueError(f"an outcome on an unknown rank {event[2]!r}")
        scope = event[3]
        health = self.state.health
        engine, rank = health.engine(key.engine), health.rank(key)
        before = (engine.state(when), rank.state(when))
        if scope is None:
            health.record_success(key, when)
        elif scope == "engine" or scope == "rank":
            health.record_failure(key, scope, when)
        else:
            raise ValueError(f"an outcome of unknown scope {scope!r}")
        return (engine.state(when), rank.state(when)) != before

    def _cancel(self, request_id: str, when: float) -> None:
        task = self._waiting.get(request_id)
        if task is not None:
            self._cancelling.add(request_id)
            task.cancel()
        elif self.state.view.rank_of(request_id) is not None:
            self._end(request_id, when)
        else:
            self._cancelled[request_id] = None
            while len(self._cancelled) > CANCELLED_REMEMBERED:
                self._cancelled.popitem(last=False)

    async def remember_response(self, request: web.Request) -> web.Response:
        """``PUT /v1/responses/{response_id}``: remember the rank that stores a Response."""
        try:
            body = await request.json()
            key = RankKey(str(body["engine"]), int(body["rank"]))
            model = str(body["model"])
            if not self.state.view.has_rank(key):
                raise ValueError(f"unknown rank {key}")
        except (KeyError, TypeError, ValueError) as exc:
            return web.json_response({"error": {"kind": "bad_request", "message": str(exc)}}, status=400)
        self.state.response_homes.remember(request.match_info["response_id"], key, model, self.state.clock())
        return web.Response(status=204)

    async def response_home(self, request: web.Request) -> web.Response:
        """``GET /v1/responses/{response_id}``: the rank that stores a Response, or 404."""
        home = self.state.response_homes.lookup(request.match_info["response_id"], self.state.clock())
        if home is None:
            return web.json_response({}, status=404)
        return web.json_response({"engine": home.rank.engine, "rank": home.rank.rank, "model": home.model})

    async def health(self, request: web.Request) -> web.Response:
        """``GET /v1/health`` (a front door's probe and heartbeat)."""
        self._heard_from(request.query.get("front_door"))
        return web.json_response({"epoch": self.epoch, "policy": self.state.settings.policy})

    async def metrics(self, request: web.Request) -> web.Response:
        """``GET /metrics``."""
        return web.Response(body=self.state.metrics.render(), content_type="text/plain", charset="utf-8")


@contextlib.asynccontextmanager
async def running_service(
    settings: Settings, *, host: str | None = None, port: int = 0, unix_path: str | None = None
) -> AsyncIterator[tuple[SchedulerService, str]]:
    """Run the scheduler service for ``settings``'s engines for the duration of the context.

    Args:
        settings: the gateway settings (of its ``scheduler_service`` section, if any, only ``front_door_expiry_s``
            is read: the service schedules itself).
        host: address to listen on (TCP), with ``port`` (0 picks a free one); ignored with ``unix_path``.
        unix_path: a Unix socket to listen on instead.

    Yields:
        The service and its URL (``http://host:port`` or ``unix:/path``), once it accepts connections.
    """
    config = settings.scheduler_service
    expiry_s = DEFAULT_EXPIRY_S if config is None else config.front_door_expiry_s
    state = build_state(settings.model_copy(update={"scheduler_service": None}))
    service = SchedulerService(state, expiry_s)
    runner = web.AppRunner(service.application(), access_log=None, handle_signals=False)
    await runner.setup()
    expiry: asyncio.Task[None] | None = None
    try:
        await state.scraper.start()
        await state.prober.start()
        await state.dispatcher.start()
        if state.discovery is not None:
            await state.discovery.start()
        expiry = asyncio.create_task(service._expiry_loop(), name="gateway-scheduler-expiry")
        site: web.BaseSite
        if unix_path is not None:
            site = web.UnixSite(runner, unix_path)
            await site.start()
            url = f"unix:{unix_path}"
        else:
            site = web.TCPSite(runner, host or "127.0.0.1", port)
            await site.start()
            server = site._server  # aiohttp keeps the bound sockets there; port 0 is resolved only on them
            assert isinstance(server, asyncio.base_events.Server)
            bound = server.sockets[0].getsockname()
            url = f"http://{host or '127.0.0.1'}:{bound[1]}"
        log.info("scheduler service (%s, epoch %s, pid %d) on %s", settings.policy, service.epoch, os.getpid(), url)
        yield service, url
    finally:
        if expiry is not None:
            expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await expiry
        await runner.cleanup()
        if state.discovery is not None:
            await state.discovery.stop()
        await state.engine_set.aclose()
        await state.dispatcher.stop()
        await state.prober.stop()
        await state.scraper.stop()
        await state.client.aclose()
