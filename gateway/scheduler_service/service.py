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
- ``GET /v1/health``: ``{"epoch", "policy"}``; ``GET /metrics``: its Prometheus metrics (the window's, the ranks'
  loads as it sees them).

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

from gateway.config import Settings
from gateway.errors import GatewayError, NoCapacityError, OverloadedError
from gateway.scheduler_service.protocol import apply_progress, decode_request, encode_placement, event_times
from gateway.server.app import build_state
from gateway.server.state import GatewayState
from gateway.types import PendingRequest

log = logging.getLogger(__name__)

CANCELLED_REMEMBERED = 4096
"""Cancellations of requests not (yet) asked for that the service remembers, so a placement asked for after its
cancellation (the two travel on different connections) is refused rather than leaked."""

_JSON = "application/json"


def error_answer(exc: GatewayError) -> dict[str, Any]:
    """The body of a placement the service refuses with ``exc``."""
    kind = "overloaded" if isinstance(exc, OverloadedError) else "no_capacity"
    return {"error": {"kind": kind, "code": exc.code, "message": exc.message}}


class SchedulerService:
    """The routes of the service around one running gateway state (its dispatcher, view, scraper, prober).

    Args:
        state: the scheduling state (:func:`~gateway.server.app.build_state`), started by the caller.
    """

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.dispatcher = state.dispatcher
        self.epoch = uuid.uuid4().hex[:16]
        self._waiting: dict[str, asyncio.Task[Any]] = {}
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        self._cancelling: set[str] = set()
        self._last_event_s = -math.inf
        self._engines = frozenset(state.engines)

    def application(self) -> web.Application:
        """The aiohttp application serving the routes."""
        app = web.Application()
        app.router.add_post("/v1/place", self.place)
        app.router.add_post("/v1/events", self.events)
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
        events = body.get("events")
        if events and body.get("epoch") == self.epoch:
            self._apply_events(events)
        if pending.request_id in self._cancelled:
            del self._cancelled[pending.request_id]
            return web.json_response(error_answer(NoCapacityError("the client went away")))
        if not self.dispatcher.scheduler.batched:
            return web.json_response(await self._acquire(pending))
        response = web.StreamResponse(headers={"Content-Type": _JSON})
        await response.prepare(request)  # the headers tell the front door the service is alive
        answer = await self._acquire(pending)
        try:
            await response.write(json.dumps(answer).encode())
            await response.write_eof()
        except (ConnectionError, RuntimeError):  # the front door went away: nobody will run the request
            if "rank" in answer:
                self.dispatcher.finish(pending.request_id)
        return response

    async def _acquire(self, pending: PendingRequest) -> dict[str, Any]:
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
        return encode_placement(placement, self.epoch)

    async def events(self, request: web.Request) -> web.Response:
        """``POST /v1/events``: apply a front door's batch of progress events."""
        body = await request.json()
        if body.get("epoch") != self.epoch:
            return web.json_response({"epoch": self.epoch}, status=409)
        self._apply_events(body["events"])
        return web.Response(status=204)

    def _apply_events(self, events: list[Any]) -> None:
        """Apply a front door's batch of events, dated by their ages at receipt."""
        received = self.state.clock()
        times = event_times(events, received, self._last_event_s)
        for event, when in zip(events, times, strict=True):
            try:
                if event[0] == "c":
                    self._cancel(str(event[2]), when)
                else:
                    apply_progress(self.dispatcher, event, when, self._engines)
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                log.warning("scheduler service: dropped a malformed event %r: %s", event[:3], exc)
        if times:
            self._last_event_s = times[-1]

    def _cancel(self, request_id: str, when: float) -> None:
        task = self._waiting.get(request_id)
        if task is not None:
            self._cancelling.add(request_id)
            task.cancel()
        elif self.state.view.rank_of(request_id) is not None:
            self.dispatcher.finish(request_id, when)
        else:
            self._cancelled[request_id] = None
            while len(self._cancelled) > CANCELLED_REMEMBERED:
                self._cancelled.popitem(last=False)

    async def health(self, request: web.Request) -> web.Response:
        """``GET /v1/health``."""
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
        settings: the gateway settings (its ``scheduler_service`` section, if any, is ignored: the service
            schedules itself).
        host: address to listen on (TCP), with ``port`` (0 picks a free one); ignored with ``unix_path``.
        unix_path: a Unix socket to listen on instead.

    Yields:
        The service and its URL (``http://host:port`` or ``unix:/path``), once it accepts connections.
    """
    state = build_state(settings.model_copy(update={"scheduler_service": None}))
    service = SchedulerService(state)
    runner = web.AppRunner(service.application(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await state.scraper.start()
        await state.prober.start()
        await state.dispatcher.start()
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
        await runner.cleanup()
        await state.dispatcher.stop()
        await state.prober.stop()
        await state.scraper.stop()
        await state.client.aclose()
