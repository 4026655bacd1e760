"""The front door's dispatcher when a scheduler service places requests: :class:`RemoteDispatcher`, with the same
interface as :class:`~gateway.dispatch.Dispatcher` (it is one), so the proxy, the retries and the P/D relay do not
know which of the two they talk to.

- :meth:`~RemoteDispatcher.acquire` asks the service for a placement (``scheduler_service.deadline_s`` for its
  answer to begin) and counts the answer in this front door's own load view too.
- Progress (first token, tokens, finish, cancellation) goes to the local scheduler at once and to the service in
  batches (:class:`~gateway.scheduler_service.protocol.ProgressBuffer`): with the next placement asked for, or in
  an events post (one in flight at a time) on the next turn of the event loop for first tokens and finishes,
  within ``scheduler_service.events_flush_s`` for token counts.
- Retries (:meth:`~RemoteDispatcher.retry_placement`) are placed locally, at once, and the service told.
- Request outcomes on ranks (failures and successes, as its circuit breakers record them) go to the service too
  (``h`` events), so a rank failing through one front door stops taking placements for every front door.
- The front door names itself (:attr:`~RemoteDispatcher.front_door`) in every call, and sends a heartbeat (``GET
  /v1/health``) when it has not called the service for ``scheduler_service.heartbeat_s``: the service releases
  the requests of a front door it has not heard from for ``front_door_expiry_s``.
- **Fallback.** When a call fails (no answer within the deadline, a refused connection, an unknown answer), the
  front door places locally from then on: with its own scheduler and load view, which its scrapers and probers
  kept current all along (so the first local decision is not made blind, and herding on one rank is avoided),
  counted in ``gateway_scheduler_service_fallbacks_total``, shown by ``gateway_scheduler_service_mode`` (1 through
  the service, 0 local) and logged once. Requests waiting for the service's answer are placed locally at once
  (should the same run of the service answer again, it is told to drop them); events for requests the lost
  service placed are dropped (the front door takes a new id, so the service expires what it placed under
  the old one). A probe (``GET /v1/health``), after
  ``probe_interval_s`` doubling up to ``probe_max_interval_s``, brings the front door back when the service
  answers again (logged once).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.config import SchedulerServiceConfig, Settings
from gateway.dispatch import Dispatcher, Placement
from gateway.errors import NoCapacityError, OverloadedError
from gateway.load.health import HealthBook
from gateway.load.view import LoadView
from gateway.scheduler_service.client import ServiceClient, ServiceUnavailable
from gateway.scheduler_service.protocol import ProgressBuffer, decode_placement, encode_request
from gateway.telemetry import GatewayMetrics
from gateway.types import FailureScope, PendingRequest, RankKey

log = logging.getLogger(__name__)

ORPHANS_REMEMBERED = 4096
"""Requests a slow service may have placed after this front door placed them itself, remembered so the service can
be told to drop them when it answers again."""


class ServiceMetrics:
    """The front door's metrics of its scheduler service, in the gateway's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.fallbacks = Counter(
            "gateway_scheduler_service_fallbacks",
            "Times this front door stopped placing through the scheduler service and placed locally",
            registry=registry,
        )
        self.replaced = Counter(
            "gateway_scheduler_service_replaced",
            "Requests the scheduler service failed to place in time, placed locally instead",
            registry=registry,
        )
        self.mode = Gauge(
            "gateway_scheduler_service_mode",
            "1 while requests are placed through the scheduler service, 0 while placed locally",
            registry=registry,
        )
        self.mode.set(1)


class RemoteDispatcher(Dispatcher):
    """A dispatcher placing through a scheduler service, falling back to its own scheduler (module docstring).

    Args:
        settings: gateway settings; ``scheduler_service`` must be set.
        view, metrics, health, clock: as :class:`~gateway.dispatch.Dispatcher`'s (its local scheduling).
        client: the service's client (tests pass one towards a fake); built from the settings when ``None``.

    Raises:
        ValueError: ``settings.scheduler_service`` is not set.
    """

    def __init__(
        self,
        settings: Settings,
        view: LoadView,
        metrics: GatewayMetrics,
        health: HealthBook | None = None,
        clock: Callable[[], float] = time.monotonic,
        client: ServiceClient | None = None,
    ) -> None:
        if settings.scheduler_service is None:
            raise ValueError("a RemoteDispatcher needs the scheduler_service section")
        super().__init__(settings, view, metrics, health, clock)
        self.config: SchedulerServiceConfig = settings.scheduler_service
        self.client = client or ServiceClient(self.config)
        self.service_metrics = ServiceMetrics(metrics.registry)
        self.buffer = ProgressBuffer(self.scheduler.step_clock.boundary_gap_s)
        self._id = uuid.uuid4().hex[:12]
        self._session = 0
        self.front_door = f"{self._id}.0"
        """This front door's id at the service (a new one after each fallback)."""
        if health is not None:
            health.listener = self._outcome
        self.remote = True
        """Whether requests are placed through the service now (``False``: locally, until a probe succeeds)."""
        self.epoch: str | None = None
        """The epoch of the service run that answered last."""
        self._placed_by: dict[str, str] = {}
        self._orphans: dict[str, str] = {}
        self._asking: dict[str, asyncio.Task[Any]] = {}
        self._aborted: set[str] = set()
        self._flush_wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._prober: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the connection pool, ask the service's epoch (placing locally at once if it does not answer), and
        start the events sender (and the local window loop)."""
        await super().start()
        await self.client.start()
        try:
            self.epoch = await self.client.health(self.front_door)
        except ServiceUnavailable as exc:
            self.fall_back(str(exc))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop(), name="gateway-scheduler-events")

    async def stop(self) -> None:
        """Stop the events sender and the prober, close the pool, then stop the local loop."""
        for task in (self._flusher, self._prober):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._flusher = self._prober = None
        await self.client.aclose()
        await super().stop()

    # -- placing -----------------------------------------------------------------------------------------

    async def acquire(self, request: PendingRequest) -> Placement:
        """Place ``request`` through the service, or locally when it is down (see the module docstring).

        Raises:
            NoCapacityError: no usable rank serves the model (as the service or the local scheduler found).
            OverloadedError: the window is full, or the request waited past its queue timeout.
        """
        if self.remote:
            try:
                return await self._acquire_remote(request)
            except ServiceUnavailable as exc:
                self.fall_back(str(exc))
                self.service_metrics.replaced.inc()
        return await super().acquire(request)

    async def _acquire_remote(self, request: PendingRequest) -> Placement:
        now = self.clock()
        request_id = request.request_id
        wait_s = max(0.0, request.arrival_s + self.queue_timeout_s - now) if self.scheduler.batched else 0.0
        task = asyncio.current_task()
        assert task is not None
        self._asking[request_id] = task
        try:
            body: dict[str, Any] = {"request": encode_request(request, now), "front_door": self.front_door}
            body["request"]["id"] = self._wire(request_id)
            if self.epoch is not None and len(self.buffer):  # the events owed ride along: one call, not two
                body["epoch"] = self.epoch
                body["events"] = self.buffer.take(now)
            answer = await self.client.place(body, wait_s)
        except ServiceUnavailable:
            self._orphan(request_id, self.epoch)
            raise
        except asyncio.CancelledError:
            if request_id in self._aborted:  # the service was found down meanwhile: place locally
                task.uncancel()
                self._orphan(request_id, self.epoch)
                raise ServiceUnavailable("the scheduler service failed while the request waited") from None
            if self.remote and self.epoch is not None:  # the client went away: the service must not keep it
                self.buffer.cancel(self._wire(request_id), self.clock())
                self._flush_wake.set()
            raise
        finally:
            self._asking.pop(request_id, None)
            self._aborted.discard(request_id)
        error = answer.get("error")
        if isinstance(error, dict):
            raise self._refusal(request, error)
        try:
            placement, epoch = decode_placement(answer)
        except (KeyError, TypeError, ValueError) as exc:
            raise ServiceUnavailable(f"the scheduler service answered an unknown placement: {exc}") from exc
        has_rank = self.view.has_rank  # live: engines come and go (gateway.engine_set)
        if not has_rank(placement.rank) or (placement.decode_rank is not None and not has_rank(placement.decode_rank)):
            self._orphan(request_id, epoch)
            raise ServiceUnavailable(f"the scheduler service placed on {placement}, a rank this front door lacks")
        self.epoch = epoch
        self._placed_by[request_id] = epoch
        self.adopt(request, placement)
        return placement

    def _orphan(self, request_id: str, epoch: str | None) -> None:
        """Remember a request the service may have placed although this front door placed it locally (the answer
        came too late, or was unusable): the service is told to drop it if it answers again in the same run."""
        if epoch is None:
            return
        self._orphans[request_id] = epoch
        while len(self._orphans) > ORPHANS_REMEMBERED:
            del self._orphans[next(iter(self._orphans))]

    def _refusal(self, request: PendingRequest, error: dict[str, Any]) -> Exception:
        """The error the service's refusal stands for."""
        message = str(error.get("message", "the scheduler service refused the request"))
        kind = error.get("kind")
        if kind == "overloaded":
            code = error.get("code")
            self.metrics.rejected.labels("window_full" if code == "window_full" else "queue_deadline").inc()
            return OverloadedError(message, code=str(code) if code else None)
        if kind == "no_capacity":
            return NoCapacityError(message)
        return ServiceUnavailable(f"the scheduler service refused {request.request_id}: {message}")

    def retry_placement(self, request: PendingRequest, failed: set[RankKey]) -> Placement:
        """Place a retry locally, at once (:meth:`Dispatcher.retry_placement`), and tell the service.

        Raises:
            NoCapacityError: no other usable rank serves the model.
        """
        placement = super().retry_placement(request, failed)
        if self.remote and self.epoch is not None:
            wired = dataclasses.replace(request, request_id=self._wire(request.request_id))
            self.buffer.placed(wired, placement, self.clock())
            self._placed_by[request.request_id] = self.epoch
            self._flush_wake.set()
        return placement

    def place_on(self, request: PendingRequest, key: RankKey) -> Placement:
        """:meth:`Dispatcher.place_on`, and the service told, as of a retry's placement."""
        placement = super().place_on(request, key)
        if self.remote and self.epoch is not None:
            wired = dataclasses.replace(request, request_id=self._wire(request.request_id))
            self.buffer.placed(wired, placement, self.clock())
            self._placed_by[request.request_id] = self.epoch
            self._flush_wake.set()
        return placement

    def _wire(self, request_id: str) -> str:
        """``request_id`` as the service knows it: prefixed with this front door's id, since front doors number
        their requests independently (two of them may both send ``r0``)."""
        return f"{self._id}:{request_id}"

    # -- progress ----------------------------------------------------------------------------------------

    def _outcome(self, key: RankKey, scope: FailureScope | None, now: float) -> None:
        """The circuit breakers recorded a request's outcome on ``key``: the service is told."""
        if self.remote and self.epoch is not None:
            self.buffer.outcome(key, scope, now)
            self._flush_wake.set()

    def _owes(self, request_id: str) -> bool:
        """Whether the service (the run of it answering now) placed ``request_id``."""
        return self.remote and self.epoch is not None and self._placed_by.get(request_id) == self.epoch

    def first_token(self, request_id: str, engine: str, now: float | None = None) -> None:
        """:meth:`Dispatcher.first_token`, and the service told."""
        super().first_token(request_id, engine, now)
        if self._owes(request_id):
            self.buffer.first_token(self._wire(request_id), engine, self.clock() if now is None else now)
            self._flush_wake.set()

    def tokens(self, request_id: str, engine: str, n: int, now: float | None = None) -> None:
        """:meth:`Dispatcher.tokens`, and the service told (coalesced)."""
        super().tokens(request_id, engine, n, now)
        if self._owes(request_id):
            self.buffer.tokens(self._wire(request_id), engine, n, self.clock() if now is None else now)
            self._flush_wake.set()

    def finish(self, request_id: str, now: float | None = None) -> None:
        """:meth:`Dispatcher.finish`, and the service told."""
        super().finish(request_id, now)
        if self._owes(request_id):
            self.buffer.finish(self._wire(request_id), self.clock() if now is None else now)
            self._flush_wake.set()
        self._placed_by.pop(request_id, None)

    async def _flush_loop(self) -> None:
        """Send the buffered events: one post in flight at a time, token counts at most every
        ``events_flush_s``."""
        while True:
            try:
                async with asyncio.timeout(self.config.heartbeat_s):
                    await self._flush_wake.wait()
            except TimeoutError:  # nothing to send for heartbeat_s: tell the service this front door lives
                await self._heartbeat()
                continue
            self._flush_wake.clear()
            await asyncio.sleep(0 if self.buffer.urgent else self.config.events_flush_s)
            epoch = self.epoch
            if not self.remote or epoch is None:
                self.buffer.clear()
                continue
            events = self.buffer.take(self.clock())
            if not events:
                continue
            try:
                current = await self.client.post_events(epoch, events, self.front_door)
            except ServiceUnavailable as exc:
                self.fall_back(str(exc))
                continue
            if current is not None:
                self._new_epoch(current)

    async def _heartbeat(self) -> None:
        """``GET /v1/health`` with this front door's id, while placing through the service."""
        if not self.remote:
            return
        try:
            self._new_epoch(await self.client.health(self.front_door))
        except ServiceUnavailable as exc:
            self.fall_back(str(exc))

    def _new_epoch(self, current: str) -> None:
        """The service answered with epoch ``current``: if it is a new run, its view starts afresh."""
        if current != self.epoch:
            log.info(
                "scheduler service %s restarted (epoch %s): events for its earlier run dropped",
                self.client.url,
                current,
            )
            self.epoch = current

    # -- fallback and recovery ---------------------------------------------------------------------------

    def fall_back(self, reason: str) -> None:
        """Place locally from now on (counted, logged once), place the requests waiting for the service locally,
        drop the events owed to it, and start probing it."""
        if not self.remote:
            return
        self.remote = False
        self._session += 1
        self.front_door = f"{self._id}.{self._session}"  # the service expires what the old id placed
        self.service_metrics.fallbacks.inc()
        self.service_metrics.mode.set(0)
        log.warning(
            "scheduler service %s failed (%s): placing requests locally until it answers again", self.client.url, reason
        )
        self.buffer.clear()
        self._placed_by.clear()
        for request_id, task in self._asking.items():
            self._aborted.add(request_id)
            task.cancel()
        if self._prober is None or self._prober.done():
            # a context of its own: not the log context of the request whose failure started it
            self._prober = asyncio.create_task(
                self._probe_loop(), name="gateway-scheduler-probe", context=contextvars.Context()
            )

    async def _probe_loop(self) -> None:
        """Probe the service with backoff until it answers, then place through it again."""
        interval = self.config.probe_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                epoch = await self.client.health(self.front_door)
            except ServiceUnavailable:
                interval = min(2 * interval, self.config.probe_max_interval_s)
                continue
            now = self.clock()
            for request_id, placed_in in self._orphans.items():
                if placed_in == epoch:  # a slow service, not a dead one: it may still hold them
                    self.buffer.cancel(self._wire(request_id), now)
            self._orphans.clear()
            self.epoch = epoch
            self.remote = True
            self.service_metrics.mode.set(1)
            self._flush_wake.set()
            log.warning(
                "scheduler service %s answers again (epoch %s): placing requests through it", self.client.url, epoch
            )
            return


def make_dispatcher(
    settings: Settings,
    view: LoadView,
    metrics: GatewayMetrics,
    health: HealthBook | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Dispatcher:
    """The front door's dispatcher: a :class:`RemoteDispatcher` when ``scheduler_service`` is set, else a plain
    :class:`~gateway.dispatch.Dispatcher` (one process scheduling alone)."""
    if settings.scheduler_service is None:
        return Dispatcher(settings, view, metrics, health, clock=clock)
    return RemoteDispatcher(settings, view, metrics, health, clock)
