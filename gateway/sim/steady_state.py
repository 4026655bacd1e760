"""Steady state and the maximum sustainable rate of a policy on a trace, in virtual time.

A 10-minute slice at a high rate is a transient: it ends before the running set fills, so a policy that falls
behind a little looks only a little worse. Here a rate is *sustainable* for a policy when a long run (a whole
trace hour) at that rate is in steady state and meets the SLO:

- **no backlog growth over the second half**: the backlog at ``t`` is the number of requests arrived by ``t``
  whose first token has not reached the gateway by ``t`` (waiting in the window or in an engine). It is sampled
  at :data:`SAMPLES` evenly spaced times over the second half of the arrivals (from the midpoint to the last
  arrival), and the least-squares slope times that half's length is its growth. The run keeps up when the
  growth is at most the larger of one request per DP rank and :data:`GROWTH_FRACTION` of the half's mean
  backlog (bursts make the backlog swing; a run falling behind grows it in proportion to the time);
- **the SLO met by at least** :data:`ATTAINMENT` **of all requests** (:meth:`SimResult.goodput`).

The maximum sustainable rate is found by bisection over the trace's rate scale (:func:`max_sustainable_scale`):
deterministic, at most ``steps + 2`` runs, and exact to ``(hi - lo) / 2**steps`` of the scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.sim.simulate import SimResult, Slo

SAMPLES = 20
"""Backlog samples over the second half of the arrivals."""

GROWTH_FRACTION = 0.25
"""Largest backlog growth over the second half, as a fraction of that half's mean backlog, that still counts as
steady: a backlog growing linearly from zero over the whole run grows by its mid-run value over the second half,
four times this."""

ATTAINMENT = 0.9
"""Fraction of requests that must meet the SLO at a sustainable rate (the report's criterion since issue 3)."""


def backlog_at(result: SimResult, t: float) -> int:
    """Requests arrived by ``t`` whose first token had not reached the gateway by ``t`` (never, if it failed)."""
    return sum(1 for r in result.records if r.arrival_s <= t and (r.first_token_s is None or r.first_token_s > t))


@dataclass(frozen=True)
class Steadiness:
    """Whether a run kept up over its second half, and by what measure.

    Attributes:
        growth: least-squares backlog growth over the second half of the arrivals, requests.
        allowed: the largest growth that counts as steady, requests.
        mean_backlog: mean sampled backlog over the second half, requests.
        slo_attainment: fraction of all requests that met the SLO.
    """

    growth: float
    allowed: float
    mean_backlog: float
    slo_attainment: float

    @property
    def steady(self) -> bool:
        """No backlog growth beyond :attr:`allowed`."""
        return self.growth <= self.allowed

    @property
    def sustainable(self) -> bool:
        """Steady and the SLO met by at least :data:`ATTAINMENT` of requests."""
        return self.steady and self.slo_attainment >= ATTAINMENT

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "growth": self.growth,
            "allowed": self.allowed,
            "mean_backlog": self.mean_backlog,
            "slo_attainment": self.slo_attainment,
            "steady": self.steady,
            "sustainable": self.sustainable,
        }


def steadiness(result: SimResult, slo: Slo, ranks: int) -> Steadiness:
    """Judge ``result`` (a run on a cluster of ``ranks`` DP ranks) by the module docstring's criteria.

    Raises:
        ValueError: fewer than two requests, or all arriving at once.
    """
    first, last = result.records[0].arrival_s, result.records[-1].arrival_s
    if len(result.records) < 2 or last <= first:
        raise ValueError("need at least two requests arriving at different times")
    mid = (first + last) / 2
    times = [mid + (last - mid) * i / (SAMPLES - 1) for i in range(SAMPLES)]
    backlog = [float(backlog_at(result, t)) for t in times]
    mean_t, mean_b = sum(times) / SAMPLES, sum(backlog) / SAMPLES
    slope = sum((t - mean_t) * (b - mean_b) for t, b in zip(times, backlog, strict=True)) / sum(
        (t - mean_t) ** 2 for t in times
    )
    return Steadiness(
        growth=slope * (last - mid),
        allowed=max(float(ranks), GROWTH_FRACTION * mean_b),
        mean_backlog=mean_b,
        slo_attainment=result.goodput(slo)["slo_attainment"],
    )


@dataclass(frozen=True)
class SustainableRate:
    """The outcome of :func:`max_sustainable_scale`.

    Attributes:
        scale: the highest rate scale found sustainable; 0.0 when even the lowest tried was not.
        probes: every scale tried, in order, with whether it was sustainable.
    """

    scale: float
    probes: list[tuple[float, bool]] = field(default_factory=list)


def max_sustainable_scale(
    sustainable: Callable[[float], bool], lo: float, hi: float, steps: int = 6
) -> SustainableRate:
    """The highest rate scale in ``[lo, hi)`` at which ``sustainable(scale)`` holds, by geometric bisection.

    ``sustainable`` is assumed monotone (true below some scale, false above). ``lo`` is tried first: if it fails
    the answer is 0.0. Then ``steps`` bisections at the geometric mean ``sqrt(lo x hi)`` (a rate scale is a ratio,
    and bursty traces such as Azure code sustain a small fraction of their analytic capacity, so the range spans
    orders of magnitude), so ``steps + 1`` calls, and the answer is within a factor ``(hi / lo) ** (1 / 2**steps)``
    below the true threshold, or below ``hi`` when every probe held. ``hi`` itself is never run: it is meant to be
    beyond reach, and an overloaded run is the slowest to simulate.

    Raises:
        ValueError: ``not 0 < lo < hi`` or ``steps < 0``.
    """
    if not 0 < lo < hi or steps < 0:
        raise ValueError(f"need 0 < lo < hi and steps >= 0, got lo={lo}, hi={hi}, steps={steps}")
    probes: list[tuple[float, bool]] = []

    def ok(scale: float) -> bool:
        result = sustainable(scale)
        probes.append((scale, result))
        return result

    if not ok(lo):
        return SustainableRate(0.0, probes)
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return SustainableRate(lo, probes)
