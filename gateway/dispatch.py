"""The asyncio loop between the front door and the scheduler: a thin driver of
:class:`~gateway.scheduling.scheduler.Scheduler`.

A request handler calls :meth:`Dispatcher.acquire`, which returns a :class:`Placement` once the request is
placed: at once for an immediate policy, when its window closes for ``sbs``. The handler then reports the
request's progress (first token, tokens, finish), which the dispatcher hands to the scheduler's progress
methods with the time, so the load view stays current between scrapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.config import Settings
from gateway.errors import NoCapacityError, OverloadedError
from gateway.load.health import HealthBook
from gateway.load.view import LoadView
from gateway.scheduling.scheduler import NoServingRankError, Scheduler, WindowFullError, record_dispatch
from gateway.telemetry import GatewayMetrics
from gateway.types import PendingRequest, RankKey, RankMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a request was placed.

    Attributes:
        rank: the DP rank (of a P/D request: its prefill rank).
        window_id: sequence number of the window that placed it (policy ``sbs``), ``None`` when placed at once.
        decode_rank: the decode rank of a P/D request, ``None`` for a request served whole by one rank.
    """

    rank: RankKey
    window_id: int | None = None
    decode_rank: RankKey | None = None


def _no_rank(model: str) -> NoCapacityError:
    return NoCapacityError(f"no usable engine rank serves model {model!r}")


class Dispatcher:
    """Places requests on DP ranks with the configured policy and keeps the load view current.

    Args:
        settings: gateway settings (policy, window, allocator, decode, baselines).
        view: the load view shared with the scraper.
        metrics: the gateway's metrics.
        health: the engines' and ranks' circuit breakers (told of every placement); none when ``None``.
        clock: monotonic clock in seconds (injectable for tests).
    """

    def __init__(
        self,
        settings: Settings,
        view: LoadView,
        metrics: GatewayMetrics,
        health: HealthBook | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.view = view
        self.metrics = metrics
        self.health = health
        self.clock = clock
        self.queue_timeout_s = settings.window.queue_timeout_s
        self.scheduler = Scheduler(
            settings.policy,
            view,
            window=settings.window,
            allocator=settings.allocator,
            decode=settings.decode,
            prefix_cache=settings.prefix_cache,
            seed=settings.baselines.seed,
            pd=settings.pd,
            tenants=settings.tenants,
        )
        for engine in settings.engines:
            if engine.prefill_alignment in ("prefill_delayer", "prefill_schedule_interval"):
                self.scheduler.set_prefill_alignment(engine.name, True)
        self._waiters: dict[str, asyncio.Future[Placement]] = {}
        self._windows_closed = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the window loop (policy ``sbs``)."""
        if self.scheduler.batched and self._task is None:
            self._task = asyncio.create_task(self._run(), name="gateway-window")

    async def stop(self) -> None:
        """Stop the loop; requests still buffered fail with :class:`NoCapacityError`."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(NoCapacityError("the gateway is shutting down"))
        self._waiters.clear()

    # -- placing -----------------------------------------------------------------------------------------

    async def acquire(self, request: PendingRequest) -> Placement:
        """Wait until ``request`` is placed on a DP rank and return where.

        The request then counts as in flight on that rank until :meth:`finish`. Cancelling the caller while
        it waits removes the request from the window.

        Raises:
            NoCapacityError: no usable rank serves the request's model.
            OverloadedError: the window is full (code ``window_full``), or the request is still buffered
                ``window.queue_timeout_s`` after its arrival (code ``queue_timeout``).
        """
        try:
            key = self.scheduler.submit(request, self.clock())
        except NoServingRankError:
            raise _no_rank(request.model) from None
        except WindowFullError as exc:
            self.metrics.rejected.labels("window_full").inc()
            raise OverloadedError(f"the gateway is overloaded: {exc}") from exc
        if key is not None:
            return self._placed(request, key)
        future: asyncio.Future[Placement] = asyncio.get_running_loop().create_future()
        self._waiters[request.request_id] = future
        self.metrics.window_buffered.set(len(self.scheduler.window))
        self._wake.set()
        budget_s = max(0.0, request.arrival_s + self.queue_timeout_s - self.clock())
        try:
            async with asyncio.timeout(budget_s):
                return await future
        except TimeoutError:
            self._abandon(request, future)
            self.metrics.rejected.labels("queue_deadline").inc()
            raise OverloadedError(
                f"the request waited {self.queue_timeout_s:g} s for a rank with room: the engines are saturated",
                code="queue_timeout",
            ) from None
        except asyncio.CancelledError:
            self._abandon(request, future)
            raise

    def _abandon(self, request: PendingRequest, future: asyncio.Future[Placement]) -> None:
        """The waiter of ``request`` gave up: take it out of the window, or release it if it was just placed."""
        self._waiters.pop(request.request_id, None)
        placed = future.done() and not future.cancelled() and future.exception() is None
        if not self.scheduler.cancel(request.request_id) and placed:
            self.finish(request.request_id)
        self.metrics.window_buffered.set(len(self.scheduler.window))

    def place_retry(self, request: PendingRequest, failed: set[RankKey]) -> RankKey:
        """Place a request again after it failed on the ranks in ``failed``, at once (it already waited its window;
        see :meth:`~gateway.scheduling.scheduler.Scheduler.place_retry`).

        Raises:
            NoCapacityError: no other usable rank serves the model.
        """
        return self.retry_placement(request, failed).rank

    def retry_placement(self, request: PendingRequest, failed: set[RankKey]) -> Placement:
        """:meth:`place_retry` with the whole placement (a P/D request's new pair of ranks).

        Raises:
            NoCapacityError: no other usable rank serves the model.
        """
        try:
            key = self.scheduler.place_retry(request, failed, self.clock())
        except NoServingRankError:
            raise _no_rank(request.model) from None
        return self._placed(request, key)

    def place_on(self, request: PendingRequest, key: RankKey) -> Placement:
        """Place ``request`` on ``key``, a rank the caller chose (a Responses follow-up goes to the rank that stores
        its conversation), at once and without the window: counted in the load view and the prefix index as any
        placement (:meth:`adopt`)."""
        placement = Placement(key)
        self.adopt(request, placement)
        return placement

    def _placed(self, request: PendingRequest, key: RankKey, window_id: int | None = None) -> Placement:
        """Count the placement of ``request`` on ``key`` (and on its decode rank, for a P/D request)."""
        decode = self.view.decode_rank_of(request.request_id)
        self._record_dispatch(key, request.prompt_tokens)
        if decode is not None:
            self._record_dispatch(decode, None)
        return Placement(key, window_id, decode)

    def adopt(self, request: PendingRequest, placement: Placement, now: float | None = None) -> None:
        """Count a placement made elsewhere (by a scheduler service, or by a front door retrying on its own): the
        load view and the prefix index take ``request`` on ``placement.rank`` (and its decode rank), as if this
        dispatcher had placed it (at ``now``, the clock's time when ``None``). An id already in flight is
        released first."""
        when = self.clock() if now is None else now
        view = self.view
        if view.rank_of(request.request_id) is not None:
            view.on_finish(request.request_id, when)
        record_dispatch(view, self.scheduler.prefix, request, placement.rank, when)
        self._record_dispatch(placement.rank, request.prompt_tokens)
        if placement.decode_rank is not None:
            view.on_dispatch_decode(request.request_id, placement.decode_rank, request.prompt_tokens, when)
            self._record_dispatch(placement.decode_rank, None)

    def _record_dispatch(self, key: RankKey, prompt_tokens: int | None) -> None:
        """Count a dispatch to ``key``: its prompt tokens, or ``None`` for a decode leg (no prompt to prefill)."""
        if self.health is not None:
            self.health.on_dispatch(key, self.clock())
        labels = (key.engine, str(key.rank))
        self.metrics.dispatched.labels(*labels).inc()
        if prompt_tokens is not None:
            self.metrics.dispatched_tokens.labels(*labels).inc(prompt_tokens)
        self.metrics.inflight.set(self.view.inflight_count())

    # -- progress reports from request handlers ---------------------------------------------------------

    def first_token(self, request_id: str, engine: str, now: float | None = None) -> None:
        """The first output token of ``request_id`` arrived from ``engine`` (at ``now``, the clock's time when
        ``None``)."""
        self.scheduler.on_first_token(request_id, engine, self.clock() if now is None else now)
        self._wake_if_waiting()

    def tokens(self, request_id: str, engine: str, n: int, now: float | None = None) -> None:
        """``n`` more tokens of ``request_id`` arrived from ``engine`` (at ``now``, the clock's time when ``None``;
        its step clock learns step times from them).

        Tokens that begin a new step of ``engine`` wake the window loop while requests wait, as the simulator
        polls at every step end: the window may close earlier than the loop's last deadline (step-aligned
        closing re-times it to the new step), and ranks may have room again.
        """
        if self.scheduler.on_tokens(request_id, engine, n, self.clock() if now is None else now):
            self._wake_if_waiting()

    def finish(self, request_id: str, now: float | None = None) -> None:
        """``request_id`` ended (completed, failed or aborted; at ``now``, the clock's time when ``None``)."""
        self.scheduler.on_finish(request_id, self.clock() if now is None else now)
        self.metrics.inflight.set(self.view.inflight_count())
        self._wake_if_waiting()

    def on_scrape(self, engine: str, ranks: dict[int, RankMetrics], now: float) -> None:
        """A scrape of ``engine`` succeeded (the scraper's :class:`~gateway.load.scraper.ScrapeSink`): the
        scheduler restarts the engine's load from it, and the window is re-checked."""
        self.scheduler.on_scrape(engine, ranks, now)
        self._wake_if_waiting()

    def on_scrape_failure(self, engine: str, now: float) -> None:
        """A scrape of ``engine`` failed."""
        self.scheduler.on_scrape_failure(engine, now)

    def notify_load_changed(self) -> None:
        """Some rank may have room again (a circuit breaker's change): re-check the window."""
        self.scheduler.on_capacity_changed()
        self._wake_if_waiting()

    def _wake_if_waiting(self) -> None:
        if self._waiters:
            self._wake.set()

    # -- the window loop ---------------------------------------------------------------------------------

    def close_window_if_due(self) -> bool:
        """Close the window if it is due, place its batch and resolve the waiters; return whether it closed."""
        now = self.clock()
        outcome = self.scheduler.poll(now)
        self.metrics.window_interval.set(self.scheduler.window.interval_s)
        if outcome is None:
            return False
        self._windows_closed += 1
        window_id = self._windows_closed
        log.debug("window %d closed: %d placed, %d deferred", window_id, len(outcome.assigned), outcome.deferred)
        for request, key in outcome.assigned:
            placement = self._placed(request, key, window_id)
            self.metrics.window_wait.observe(now - request.arrival_s)
            future = self._waiters.pop(request.request_id, None)
            if future is not None and not future.done():
                future.set_result(placement)
            else:  # the client went away in the meantime
                self.finish(request.request_id)
        for request in outcome.unplaceable:
            future = self._waiters.pop(request.request_id, None)
            if future is not None and not future.done():
                future.set_exception(_no_rank(request.model))
        if outcome.assigned:
            self.metrics.window_batch.observe(len(outcome.assigned))
        self.metrics.window_buffered.set(len(self.scheduler.window))
        return True

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            if self.close_window_if_due():
                await asyncio.sleep(0)
                continue
            deadline = self.scheduler.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - self.clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
