"""Step-aligned window closing: close the window just before some instance starts its next step.

SBS's queueing argument (``docs/design.md`` §2.1): N instances fed by one queue whose batches leave at offsets of T/N
(T = one step) make a request wait about T/(2N), against T/2 for N gated servers. The window's grid ticks
(:class:`~gateway.scheduling.window.BatchWindow`) ignore where the instances are in their steps; here each
close is timed to the instances' step boundaries instead. From the step clock
(:class:`~gateway.scheduling.step_clock.StepClock`) every busy instance has a predicted next step start ``s_e``;
the window opened at ``t0`` closes at

    clamp(min_e(s_e) - lead_s, t0 + min_interval_s, t0 + max_interval_s)

so its batch reaches the instance about to start (phase-aware placement, :mod:`gateway.scheduling.phase`,
already prefers it) ``lead_s`` ahead, to cover the dispatch latency and the error of the prediction. With N
busy instances in different phases the closes come about T/N apart, and a request sent at a close joins a step
at once instead of queueing inside the engine. An overdue instance (predicted start already past) counts as
starting now, so the window closes after ``min_interval_s``.

When some instance serving requests has no prediction (idle, or none of its tokens seen yet) it can start at
once, so there is no boundary worth waiting for: :func:`next_step_starts` returns ``None`` and the window keeps
its own adaptive grid tick.

Some windows should not be held at all (:func:`close_at_once_reason`): a request arriving to an empty window when
no other request is expected before the window would close (holding gains a batch of one and costs its first token
the hold; at the rates of the steady-state evaluation a 5 ms window expects a few hundredths of a request), while
an instance that serves it is idle (the instance would start a step the moment the request reached it, so a hold
only delays its first token), or while every instance that serves it aligns its own prefill across its DP ranks
(SGLang's PrefillDelayer, vLLM's ``--prefill-schedule-interval``: the engine holds new prefill until its ranks line
up, so a window would hold the request twice).

Pure: no I/O, time passed in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence, Set
from dataclasses import dataclass
from typing import Literal

from gateway.scheduling.step_clock import StepClock
from gateway.types import PendingRequest, RankLoad

CloseAtOnceReason = Literal["idle", "engine_aligned", "alone"]
"""Why a window is not held: an instance serving the request is ``idle``, every instance serving it aligns its
own prefill (``engine_aligned``), or too few requests are expected to join it (``alone``)."""


@dataclass(frozen=True, slots=True)
class StepAlignedClosing:
    """When a window should close, from the instances' predicted step starts.

    Attributes:
        lead_s: how long before a predicted step start the window closes (seconds, >= 0).
        min_interval_s: shortest window, from its opening (seconds, > 0).
        max_interval_s: longest window, from its opening (seconds, >= min_interval_s).

    Raises:
        ValueError: ``lead_s < 0``, ``min_interval_s <= 0`` or ``min_interval_s > max_interval_s``.
    """

    lead_s: float
    min_interval_s: float
    max_interval_s: float

    def __post_init__(self) -> None:
        if self.lead_s < 0 or self.min_interval_s <= 0 or self.max_interval_s < self.min_interval_s:
            raise ValueError("need lead_s >= 0 and 0 < min_interval_s <= max_interval_s")

    def close_at(self, opened_s: float, next_starts: Sequence[float]) -> float:
        """The close time of a window opened at ``opened_s`` (seconds).

        Args:
            opened_s: when the window opened (its first request arrived, or deferred requests were put back).
            next_starts: each busy instance's predicted next step start (seconds, same clock; may lie in the
                past when overdue). Must not be empty.

        Raises:
            ValueError: ``next_starts`` is empty.
        """
        if not next_starts:
            raise ValueError("need at least one predicted step start")
        target = min(next_starts) - self.lead_s
        return min(opened_s + self.max_interval_s, max(opened_s + self.min_interval_s, target))


def next_step_starts(ranks: Sequence[RankLoad], clock: StepClock) -> list[float] | None:
    """Predicted next step start of every instance that has a usable rank (seconds), or ``None`` when any of them
    is idle (no running or waiting request on any rank) or has no prediction yet: such an instance can start a
    step at once.

    Args:
        ranks: a snapshot of every DP rank's load (:meth:`~gateway.load.view.LoadView.snapshot`).
        clock: the step clock fed with the instances' token arrivals.
    """
    busy: dict[str, bool] = {}
    usable: set[str] = set()
    for r in ranks:
        engine = r.key.engine
        busy[engine] = busy.get(engine, False) or r.running > 0 or r.waiting > 0
        if r.usable:
            usable.add(engine)
    starts: list[float] = []
    for engine in sorted(usable):
        start = clock.next_step_start(engine) if busy[engine] else None
        if start is None:
            return None
        starts.append(start)
    return starts or None


def close_at_once_reason(
    request: PendingRequest,
    ranks: Sequence[RankLoad],
    aligned_engines: Set[str],
    *,
    when_idle: bool,
    yield_to_alignment: bool,
    expected_arrivals: float = math.inf,
    min_arrivals: float | None = None,
) -> CloseAtOnceReason | None:
    """Why a window that ``request`` opens should close at once, or ``None`` when holding it may help.

    Args:
        request: the request arriving to an empty window.
        ranks: a snapshot of every DP rank's load (:meth:`~gateway.load.view.LoadView.snapshot`).
        aligned_engines: names of the engines that align prefill across their DP ranks themselves.
        when_idle: close at once while some instance serving the request is idle (no running or waiting request
            and no queued prefill on any of its usable ranks).
        yield_to_alignment: close at once while every usable instance serving the request is in
            ``aligned_engines``.
        expected_arrivals: requests expected to arrive while the window is open
            (:meth:`~gateway.scheduling.window.BatchWindow.expected_arrivals`).
        min_arrivals: close at once when ``expected_arrivals`` is below it; ``None`` never.

    Returns:
        ``"idle"``, ``"engine_aligned"`` or ``"alone"`` (the first that applies, in that order), or ``None``;
        ``None`` too when no usable rank serves the request (the allocator reports that).
    """
    busy: dict[str, bool] = {}
    for r in ranks:
        if r.usable and request.model in r.models:
            engine = r.key.engine
            busy[engine] = busy.get(engine, False) or r.running > 0 or r.waiting > 0 or r.queued_prefill_tokens > 0
    if not busy:
        return None
    if when_idle and not all(busy.values()):
        return "idle"
    if yield_to_alignment and all(engine in aligned_engines for engine in busy):
        return "engine_aligned"
    if min_arrivals is not None and expected_arrivals < min_arrivals:
        return "alone"
    return None
