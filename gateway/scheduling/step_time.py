"""Engine step-time estimate, from inter-token gaps the gateway observes on streams.

In a lockstep DP engine every running request receives one token per forward step, so the gap between two
consecutive chunks of one stream is one step (a step that carries chunked prefill is simply a longer gap).
An exponentially weighted moving average per engine smooths it; the window uses the mean over engines.
"""

from __future__ import annotations


class StepTimeEstimator:
    """EWMA of observed step times per engine.

    Args:
        initial_s: estimate before any observation (seconds, > 0).
        alpha: EWMA weight of a new observation (0 < alpha <= 1).
        max_gap_s: gaps longer than this are ignored as stalls, not steps (seconds).
    """

    def __init__(self, initial_s: float, *, alpha: float = 0.05, max_gap_s: float = 30.0) -> None:
        if initial_s <= 0 or not 0 < alpha <= 1:
            raise ValueError("need initial_s > 0 and 0 < alpha <= 1")
        self.initial_s = initial_s
        self.alpha = alpha
        self.max_gap_s = max_gap_s
        self._per_engine: dict[str, float] = {}

    def observe(self, engine: str, gap_s: float) -> None:
        """Record one inter-token gap of a stream served by ``engine`` (seconds)."""
        if not 0 < gap_s <= self.max_gap_s:
            return
        prev = self._per_engine.get(engine)
        self._per_engine[engine] = gap_s if prev is None else prev + self.alpha * (gap_s - prev)

    def engine_estimate(self, engine: str) -> float:
        """Step time of one engine (seconds); the initial estimate if nothing was observed."""
        return self._per_engine.get(engine, self.initial_s)

    def estimate(self) -> float:
        """Mean step time over engines observed so far (seconds)."""
        if not self._per_engine:
            return self.initial_s
        return sum(self._per_engine.values()) / len(self._per_engine)
