"""Where each engine instance is in its step, inferred from the tokens the gateway sees come back.

All DP ranks of an instance run forward steps in lockstep and every running request gets one token at the end
of each step, so token chunks from one instance arrive in bursts, one burst per step end. The first chunk after
a quiet gap of at least ``boundary_gap_s`` marks a step boundary. Knowing the last boundary and predicting the
current step's duration tells when the instance will next start a step: the moment a request sent to it
starts its prefill (``docs/design.md`` §2.8, "waiting to accelerate").

Step duration model (the form FairBatching-style load estimates use, ``docs/design.md`` §3):
``duration = base + per_token * x`` where ``x`` is the largest number of prefill tokens one rank of the
instance takes in the step (lockstep: the heaviest rank sets the pace). ``base`` (decode work plus all-to-all)
and ``per_token`` are learnt online per instance by exponentially weighted averages: ``base`` from steps that
carried no prefill, ``per_token`` from the excess of the others.

The same boundaries give the plain mean step time (boundary to boundary, whatever the step carried) that the
window's adaptive interval follows (:meth:`StepClock.mean_step_s`), and each instance's predicted next step start
that step-aligned window closing aims at (:meth:`StepClock.next_step_start`,
:mod:`gateway.scheduling.step_aligned_close`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gateway.types import RankKey


@dataclass(slots=True)
class _EngineClock:
    last_boundary: float | None = None
    last_token: float | None = None
    base_s: float | None = None
    per_token_s: float | None = None
    step_prefill_tokens: float = 0.0
    mean_step_s: float | None = None
    step_keys: list[RankKey] | None = None
    """The ranks as :meth:`StepClock.observe_tokens` last saw them at a step start, in the view's order."""
    step_tokens: list[float] | None = None
    """Each of those ranks' figure in :attr:`StepClock.current_step_tokens`, in the same order (a mirror that
    spares the dictionary within a step)."""


class StepClock:
    """Per-engine step boundaries and step-duration model.

    Args:
        initial_step_s: step duration assumed for an engine with no observation yet (seconds).
        initial_per_token_s: prefill seconds per token assumed before any is learnt.
        boundary_gap_s: a quiet gap at least this long between two chunks of one engine separates two steps.
        alpha: weight of a new observation in the duration model's moving averages (0 < alpha <= 1).
        mean_alpha: weight of a new step in the mean step time (0 < mean_alpha <= 1).
        max_step_s: a step longer than this is a stall or an idle spell, not a step: it does not enter the mean
            step time (seconds).

    Raises:
        ValueError: ``initial_step_s <= 0`` or a weight outside ``(0, 1]``.
    """

    def __init__(
        self,
        initial_step_s: float,
        *,
        initial_per_token_s: float = 1e-4,
        boundary_gap_s: float = 0.005,
        alpha: float = 0.1,
        mean_alpha: float = 0.05,
        max_step_s: float = 30.0,
    ) -> None:
        if initial_step_s <= 0 or not 0 < alpha <= 1 or not 0 < mean_alpha <= 1:
            raise ValueError("need initial_step_s > 0, 0 < alpha <= 1 and 0 < mean_alpha <= 1")
        self.initial_step_s = initial_step_s
        self.initial_per_token_s = initial_per_token_s
        self.boundary_gap_s = boundary_gap_s
        self.alpha = alpha
        self.mean_alpha = mean_alpha
        self.max_step_s = max_step_s
        self._engines: dict[str, _EngineClock] = {}
        self.current_step_tokens: dict[RankKey, float] = {}
        """Prompt tokens of each rank taken by the step in progress (the rest of its queued tokens wait for the
        next step), as :meth:`observe_tokens` last saw them."""

    def _get(self, engine: str) -> _EngineClock:
        clock = self._engines.get(engine)
        if clock is None:
            clock = self._engines[engine] = _EngineClock()
        return clock

    def on_tokens(self, engine: str, now: float) -> bool:
        """A chunk of tokens from ``engine`` arrived at ``now``; return whether it opened a new step.

        At a new step the previous one's duration is learnt, with the prefill tokens it was last told of by
        :meth:`set_step_prefill`; the new step starts with none until told.
        """
        c = self._get(engine)
        new_step = c.last_token is None or now - c.last_token >= self.boundary_gap_s
        c.last_token = now
        if not new_step:
            return False
        if c.last_boundary is not None:
            duration = now - c.last_boundary
            self._learn(c, duration, c.step_prefill_tokens)
            if 0 < duration <= self.max_step_s:
                m = c.mean_step_s
                c.mean_step_s = duration if m is None else m + self.mean_alpha * (duration - m)
        c.last_boundary = now
        c.step_prefill_tokens = 0.0
        return True

    def observe_tokens(self, engine: str, now: float, queued: Iterable[tuple[RankKey, int, int]]) -> bool:
        """Tokens from ``engine`` arrived at ``now``, with each of its ranks' ``(rank, prompt tokens queued, per-step
        prefill budget)`` as the load view has them after taking the tokens in; return whether they began a new step.

        The prompt tokens each rank has queued now, capped at its budget, are what the step in progress
        carries; within one burst of chunks (one step end) the smallest figure seen wins, since first tokens
        arriving in the burst shrink the queue while new dispatches only grow it. The heaviest rank's figure
        becomes the step's prefill (:meth:`set_step_prefill`).
        """
        new_step = self.on_tokens(engine, now)
        c = self._engines[engine]
        figures = self.current_step_tokens
        ranks = queued if isinstance(queued, list) else list(queued)
        if not new_step and c.step_keys is not None and c.step_tokens is not None and self._fall(c, ranks):
            return new_step
        heaviest = 0.0
        keys, values = [], []
        for key, tokens, budget in ranks:
            current = float(min(tokens, budget))
            if not new_step:
                current = min(current, figures.get(key, current))
            figures[key] = current
            heaviest = max(heaviest, current)
            keys.append(key)
            values.append(current)
        c.step_keys, c.step_tokens = keys, values
        self.set_step_prefill(engine, heaviest)
        return new_step

    def _fall(self, c: _EngineClock, ranks: list[tuple[RankKey, int, int]]) -> bool:
        """Within a step, lower each rank's figure to what it has queued now, through the mirror of
        :attr:`current_step_tokens` kept since the step started (each figure can only fall, so only one that falls
        is written back); return ``False``, having changed nothing the general path would not, if the ranks are
        not those of the step's start."""
        keys, values = c.step_keys, c.step_tokens
        assert keys is not None and values is not None
        if len(ranks) != len(keys):
            return False
        figures = self.current_step_tokens
        for i, (key, tokens, budget) in enumerate(ranks):
            if key is not keys[i]:
                return False
            current = float(min(tokens, budget))
            if current < values[i]:
                values[i] = current
                figures[key] = current
        c.step_prefill_tokens = max([0.0, *values])
        return True

    def set_step_prefill(self, engine: str, prefill_tokens: float) -> None:
        """The heaviest rank of ``engine`` prefills ``prefill_tokens`` in the step in progress (tokens)."""
        self._get(engine).step_prefill_tokens = prefill_tokens

    def _learn(self, c: _EngineClock, duration: float, prefill_tokens: float) -> None:
        if prefill_tokens <= 0:
            c.base_s = duration if c.base_s is None else c.base_s + self.alpha * (duration - c.base_s)
            return
        base = c.base_s if c.base_s is not None else 0.0
        sample = max(0.0, duration - base) / prefill_tokens
        c.per_token_s = sample if c.per_token_s is None else c.per_token_s + self.alpha * (sample - c.per_token_s)

    def predict(self, engine: str, prefill_tokens: float) -> float:
        """Predicted duration of a step of ``engine`` whose heaviest rank prefills ``prefill_tokens`` (s)."""
        c = self._get(engine)
        base = c.base_s if c.base_s is not None else self.initial_step_s
        per_token = c.per_token_s if c.per_token_s is not None else self.initial_per_token_s
        return base + per_token * prefill_tokens

    def mean_step_s(self) -> float:
        """Mean step time over the engines whose steps were seen, each an exponentially weighted average of its
        boundary-to-boundary times (seconds); ``initial_step_s`` before any step was seen."""
        means = [c.mean_step_s for c in self._engines.values() if c.mean_step_s is not None]
        return sum(means) / len(means) if means else self.initial_step_s

    def engine_mean_step_s(self, engine: str) -> float:
        """Mean step time of one engine (seconds); ``initial_step_s`` before any of its steps was seen."""
        m = self._get(engine).mean_step_s
        return self.initial_step_s if m is None else m

    def next_step_start(self, engine: str) -> float | None:
        """When ``engine`` is predicted to start its next step (seconds, on the clock of the token arrivals; may
        lie in the past when the step is overdue), or ``None`` before any of its tokens was seen."""
        c = self._get(engine)
        if c.last_boundary is None:
            return None
        return c.last_boundary + self.predict(engine, c.step_prefill_tokens)

    def time_to_next_step(self, engine: str, now: float) -> float:
        """Seconds until ``engine`` is predicted to start its next step (0 when overdue or never seen)."""
        start = self.next_step_start(engine)
        return 0.0 if start is None else max(0.0, start - now)

    def current_step_prefill_tokens(self, engine: str) -> float:
        """Most prefill tokens one rank of ``engine`` carries in the step in progress (as seen at its start)."""
        return self._get(engine).step_prefill_tokens
