"""Placing requests on DP ranks: the asyncio side of the scheduler.

:class:`Dispatcher` is a thin loop around the pure pieces: the staggered window
(:mod:`gateway.scheduling.window`), the allocator (:mod:`gateway.scheduling.allocation`), the immediate-dispatch
baselines (:mod:`gateway.scheduling.baselines`) and the load view (:mod:`gateway.load.view`). A request handler
calls :meth:`Dispatcher.acquire`, which returns the DP rank once the request is placed: at once for an
immediate policy, when its window closes for ``sbs``. The handler then reports the request's progress
(first token, tokens, finish) so the load view stays current between scrapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.config import Settings
from gateway.errors import NoCapacityError
from gateway.load.view import LoadView
from gateway.scheduling.allocation import free_prefill_capacity, water_fill
from gateway.scheduling.baselines import ImmediatePolicy, make_immediate_policy
from gateway.scheduling.step_time import StepTimeEstimator
from gateway.scheduling.types import PendingRequest, RankKey
from gateway.scheduling.window import StaggeredWindow
from gateway.telemetry import GatewayMetrics


@dataclass(slots=True)
class _Waiter:
    request: PendingRequest
    stream: bool
    future: asyncio.Future[RankKey]


class Dispatcher:
    """Places requests on DP ranks with the configured policy and keeps the load view current.

    Args:
        settings: gateway settings (policy, window).
        view: the load view shared with the scraper.
        metrics: the gateway's metrics.
        clock: monotonic clock in seconds (injectable for tests).
    """

    def __init__(
        self,
        settings: Settings,
        view: LoadView,
        metrics: GatewayMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.view = view
        self.metrics = metrics
        self.clock = clock
        w = settings.window
        self.step_time = StepTimeEstimator(w.initial_step_s)
        self.batched = settings.policy == "sbs"
        self._immediate: ImmediatePolicy | None = (
            None if self.batched else make_immediate_policy(settings.policy, seed=settings.seed)
        )
        self.window = StaggeredWindow(
            min_interval_s=w.min_interval_s,
            max_interval_s=w.max_interval_s,
            step_fraction=w.step_fraction,
            initial_step_s=w.initial_step_s,
        )
        self._waiters: dict[str, _Waiter] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the window loop (policy ``sbs``)."""
        if self.batched and self._task is None:
            self._task = asyncio.create_task(self._run(), name="gateway-window")

    async def stop(self) -> None:
        """Stop the loop; requests still buffered fail with :class:`NoCapacityError`."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for waiter in self._waiters.values():
            if not waiter.future.done():
                waiter.future.set_exception(NoCapacityError("the gateway is shutting down"))
        self._waiters.clear()

    # -- placing -----------------------------------------------------------------------------------------

    async def acquire(self, request: PendingRequest, *, stream: bool) -> RankKey:
        """Wait until ``request`` is placed on a DP rank and return it.

        The request then counts as in flight on that rank until :meth:`finish`. Cancelling the caller while
        it waits removes the request from the window.

        Raises:
            NoCapacityError: no usable rank serves the request's model.
        """
        if not self.batched:
            return self._place_now(request, stream)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(request, stream, loop.create_future())
        self._waiters[request.request_id] = waiter
        self.window.add(request, self.clock())
        self.metrics.window_buffered.set(len(self.window))
        self._wake.set()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            self._waiters.pop(request.request_id, None)
            removed = self.window.remove(request.request_id) is not None
            placed = waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None
            if not removed and placed:
                self.finish(request.request_id)
            self.metrics.window_buffered.set(len(self.window))
            raise

    def _place_now(self, request: PendingRequest, stream: bool) -> RankKey:
        assert self._immediate is not None
        now = self.clock()
        key = self._immediate.choose(request, self.view.snapshot(now))
        if key is None:
            raise NoCapacityError(f"no usable engine rank serves model {request.model!r}")
        self._record_dispatch(request, key, stream, now)
        return key

    def _record_dispatch(self, request: PendingRequest, key: RankKey, stream: bool, now: float) -> None:
        self.view.on_dispatch(request.request_id, key, request.prompt_tokens, now, stream=stream)
        labels = (key.engine, str(key.rank))
        self.metrics.dispatched.labels(*labels).inc()
        self.metrics.dispatched_tokens.labels(*labels).inc(request.prompt_tokens)
        self.metrics.inflight.set(self.view.inflight_count())

    # -- progress reports from request handlers ---------------------------------------------------------

    def first_token(self, request_id: str) -> None:
        """The first output token of ``request_id`` arrived."""
        self.view.on_first_token(request_id, self.clock())
        self.notify_load_changed()

    def tokens(self, request_id: str, engine: str, n: int, gap_s: float) -> None:
        """``n`` more tokens of ``request_id`` arrived from ``engine``, ``gap_s`` after the previous ones."""
        self.view.on_tokens(request_id, n)
        if n == 1:
            self.step_time.observe(engine, gap_s)

    def finish(self, request_id: str) -> None:
        """``request_id`` ended (completed, failed or aborted)."""
        self.view.on_finish(request_id, self.clock())
        self.metrics.inflight.set(self.view.inflight_count())
        self.notify_load_changed()

    def notify_load_changed(self) -> None:
        """Some rank may have room again (a scrape, a first token, a finish): re-check the window."""
        if self.batched:
            self.window.notify_capacity_freed()
            if len(self.window):
                self._wake.set()

    # -- the window loop ---------------------------------------------------------------------------------

    def close_window_if_due(self) -> bool:
        """Close the window if it is due, place its batch and resolve the waiters; return whether it closed."""
        now = self.clock()
        self.window.observe_step_time(self.step_time.estimate())
        self.metrics.window_interval.set(self.window.interval_s)
        snapshot = self.view.snapshot(now)
        if not self.window.due(now, free_prefill_capacity(snapshot)):
            return False
        batch = self.window.take(now)
        allocation = water_fill(batch, snapshot, now=now, max_wait_s=self.settings.window.max_wait_s)
        for request, key in allocation.assigned:
            waiter = self._waiters.pop(request.request_id, None)
            if waiter is None or waiter.future.done():
                continue
            self._record_dispatch(request, key, waiter.stream, now)
            self.metrics.window_wait.observe(now - request.arrival_s)
            waiter.future.set_result(key)
        for request in allocation.unplaceable:
            waiter = self._waiters.pop(request.request_id, None)
            if waiter is not None and not waiter.future.done():
                waiter.future.set_exception(NoCapacityError(f"no usable engine rank serves model {request.model!r}"))
        self.window.requeue(allocation.deferred, now, placed_any=bool(allocation.assigned))
        if allocation.assigned:
            self.metrics.window_batch.observe(len(allocation.assigned))
        self.metrics.window_buffered.set(len(self.window))
        return True

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            if self.close_window_if_due():
                await asyncio.sleep(0)
                continue
            deadline = self.window.deadline
            timeout = None if deadline is None else max(0.0, deadline - self.clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
