"""The batch window: buffer requests, release them as one batch at each tick.

A state machine with time passed in (``add``, ``due(now)``, ``take(now)``), so the same code runs under the
gateway's asyncio loop and in a virtual-time simulation.

Ticks lie on a grid ``k * interval_s``; a request arriving to an empty window waits for the next grid
tick. The interval tracks the engines' observed step time (``step_fraction * step_s``, clamped to
``[min_interval_s, max_interval_s]``): the window is short next to a step, so holding a request costs little
while the batch still gives the allocator a global view (our reading of SBS's adaptive interval,
``docs/design.md`` §2.4). The staggering proper, batches meeting instances as they start a step, comes from the
placement (:mod:`gateway.scheduling.phase`) and, when switched on, from step-aligned closing.

The deadline of an open window can instead be aligned to the engines' step boundaries (:meth:`align`, with a
close time from :mod:`gateway.scheduling.step_aligned_close`); aligning to ``None`` goes back to the grid tick.
When holding cannot help (:func:`gateway.scheduling.step_aligned_close.close_at_once_reason`), :meth:`close_now`
makes the open window due at once, whatever alignment follows, until it is taken.

The window also keeps an exponentially weighted mean of the gaps between arrivals (:meth:`expected_arrivals`):
how many requests are expected to join one window, which decides whether holding one can pay at all.

A window also closes early when its buffered prompt tokens fill the free prefill capacity of the ranks: waiting
longer cannot improve the placement. After a batch in which nothing could be placed, early closing is disarmed
until a request arrives or capacity is reported freed, so a full cluster does not spin.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from gateway.types import PendingRequest

ARRIVAL_GAP_WEIGHT = 0.05
"""Weight of the newest gap in the mean gap between arrivals: about the last 20 arrivals count (a common choice of
exponential smoothing constant, not tuned)."""


class BatchWindow:
    """Buffer of requests waiting for the next tick.

    Args:
        min_interval_s: shortest tick interval (seconds, > 0).
        max_interval_s: longest tick interval (seconds, >= min_interval_s).
        step_fraction: interval as a fraction of the observed engine step time.
        initial_step_s: step time assumed before any is observed (seconds).

    Raises:
        ValueError: bounds are not positive or ``min_interval_s > max_interval_s``.
    """

    def __init__(
        self,
        *,
        min_interval_s: float,
        max_interval_s: float,
        step_fraction: float,
        initial_step_s: float,
    ) -> None:
        if min_interval_s <= 0 or max_interval_s < min_interval_s or step_fraction <= 0:
            raise ValueError("need 0 < min_interval_s <= max_interval_s and step_fraction > 0")
        self.min_interval_s = min_interval_s
        self.max_interval_s = max_interval_s
        self.step_fraction = step_fraction
        self.interval_s = min_interval_s
        self.observe_step_time(initial_step_s)
        self._buffer: dict[str, PendingRequest] = {}
        self._tokens = 0
        self._deadline: float | None = None
        self._tick: float | None = None
        self._opened_s: float | None = None
        self._early_close_armed = True
        self._closing_now = False
        self._last_arrival_s: float | None = None
        self._mean_gap_s: float | None = None

    def observe_step_time(self, step_s: float) -> None:
        """Adapt the interval to an engine step time estimate (seconds, > 0; others are ignored)."""
        if step_s > 0 and math.isfinite(step_s):
            self.interval_s = min(self.max_interval_s, max(self.min_interval_s, self.step_fraction * step_s))

    def __len__(self) -> int:
        return len(self._buffer)

    def expected_arrivals(self) -> float:
        """Requests expected to arrive during one window: the interval over the mean gap between the arrivals seen
        so far (``0.0`` before two have been seen, ``inf`` while they all came at once)."""
        if self._mean_gap_s is None:
            return 0.0
        return math.inf if self._mean_gap_s <= 0 else self.interval_s / self._mean_gap_s

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._buffer

    @property
    def buffered_tokens(self) -> int:
        """Prompt tokens of the buffered requests."""
        return self._tokens

    def next_tick(self, now: float) -> float:
        """The first grid tick strictly after ``now``."""
        k = math.floor(now / self.interval_s) + 1
        tick = k * self.interval_s
        while tick <= now:  # floating-point rounding can land the tick on ``now`` itself
            k += 1
            tick = k * self.interval_s
        return tick

    @property
    def deadline(self) -> float | None:
        """When the current window closes, or ``None`` when it is empty."""
        return self._deadline if self._buffer else None

    @property
    def opened_s(self) -> float | None:
        """When the current window opened (its first request arrived, or deferred requests were put back), or
        ``None`` when it is empty."""
        return self._opened_s if self._buffer else None

    def align(self, close_s: float | None) -> None:
        """Set the open window's deadline to ``close_s`` (seconds), or back to its grid tick when ``None``; an
        empty window ignores it."""
        if self._buffer and not self._closing_now:
            self._deadline = self._tick if close_s is None else close_s

    def close_now(self, now: float) -> None:
        """Make the open window due at ``now`` (seconds); :meth:`align` leaves it so until :meth:`take`. An empty
        window ignores it."""
        if self._buffer:
            self._deadline = now
            self._closing_now = True

    def _open(self, now: float) -> None:
        self._opened_s = now
        self._tick = self._deadline = self.next_tick(now)

    def add(self, request: PendingRequest, now: float) -> None:
        """Buffer ``request``; an empty window opens and its deadline is set to the next tick.

        Raises:
            ValueError: a request with the same id is already buffered.
        """
        if request.request_id in self._buffer:
            raise ValueError(f"request {request.request_id!r} is already in the window")
        if self._last_arrival_s is not None:
            gap = max(0.0, now - self._last_arrival_s)
            mean = self._mean_gap_s
            self._mean_gap_s = gap if mean is None else mean + ARRIVAL_GAP_WEIGHT * (gap - mean)
        self._last_arrival_s = now
        if not self._buffer:
            self._open(now)
        self._buffer[request.request_id] = request
        self._tokens += request.prompt_tokens
        self._early_close_armed = True

    def remove(self, request_id: str) -> PendingRequest | None:
        """Drop a buffered request (its client went away); return it, or ``None`` if it is not buffered."""
        request = self._buffer.pop(request_id, None)
        if request is not None:
            self._tokens -= request.prompt_tokens
        return request

    def notify_capacity_freed(self) -> None:
        """Re-arm early closing: some rank reported free capacity."""
        self._early_close_armed = True

    def due(self, now: float, free_capacity_tokens: float) -> bool:
        """Whether the window should close now.

        Args:
            now: current time (seconds).
            free_capacity_tokens: prefill tokens the ranks can still take in their next step.
        """
        if not self._buffer:
            return False
        if self._deadline is not None and now >= self._deadline:
            return True
        return self._early_close_armed and 0 < free_capacity_tokens <= self._tokens

    def take(self, now: float) -> list[PendingRequest]:
        """Close the window: return the buffered requests in arrival order and empty the buffer."""
        batch = list(self._buffer.values())
        self._buffer.clear()
        self._tokens = 0
        self._deadline = self._tick = self._opened_s = None
        self._closing_now = False
        return batch

    def requeue(self, deferred: Iterable[PendingRequest], now: float, *, placed_any: bool) -> None:
        """Put requests that could not be placed back into the window, ahead of newer arrivals.

        Args:
            deferred: the requests to keep.
            now: current time (seconds); the window reopens then, its deadline the next tick after it.
            placed_any: whether the closed batch placed at least one request; if not, early closing is
                disarmed until an arrival or :meth:`notify_capacity_freed`.
        """
        newer = self._buffer
        self._buffer = {}
        self._tokens = 0
        for request in deferred:
            request.deferrals += 1
            self._buffer[request.request_id] = request
            self._tokens += request.prompt_tokens
        for request in newer.values():
            self._buffer[request.request_id] = request
            self._tokens += request.prompt_tokens
        if self._buffer:
            self._open(now)
        if not placed_any:
            self._early_close_armed = False
