"""Where each engine instance is in its step, inferred from the tokens the gateway sees come back.

All DP ranks of an instance run forward steps in lockstep and every running request gets one token at the end
of each step, so token chunks from one instance arrive in bursts, one burst per step end. The first chunk after
a quiet gap of at least ``boundary_gap_s`` marks a step boundary. Knowing the last boundary and predicting the
current step's duration tells when the instance will next start a step: the moment a request sent to it
starts its prefill (``docs/design.md`` §2.8, "waiting to accelerate").

Step duration model (:class:`StepTimeModel`): ``duration = a + b * H + c * S``, where ``H`` is the largest number of
prefill tokens one rank of the instance takes in the step (lockstep: the heaviest rank sets the pace) and ``S`` the
mean over its ranks (the routed experts' work is spread over the EP group, so it follows the mean). It is the linear
step-time form ``a + b * new_tokens + c * kv_tokens`` that llm-d's inference simulator attributes to FairBatching
(arXiv 2510.14392; ``docs/design.md`` §3 on where the form comes from), read per lockstep instance: its
``new_tokens`` is the heaviest rank's, and the EP-shared part of the linear cost takes the place of the KV term
(decode attention is a small part of a DeepSeek-V3 step at these batch sizes; the coefficients absorb it). The
coefficients are fitted online per instance by exponentially weighted least squares, **only from steps the gateway
can time**: the interval between two bursts is one step only if every step emits a token, which the gateway knows
when, at the first burst, some rank of the instance had requests decoding and no prompt tokens queued (so it decodes
in the next step, whatever the others do). On a prefill-only instance, where first tokens are the only tokens, no
interval qualifies and the model keeps its prior, the same for every instance (so the placement cost stays a
comparison of queued work, never a feedback loop between an instance whose steps look long because it is rarely
timed and the traffic it is therefore denied).

The same timed steps give the plain mean step time (boundary to boundary, whatever the step carried) that the
window's adaptive interval follows (:meth:`StepClock.mean_step_s`), and each instance's predicted next step start
that step-aligned window closing aims at (:meth:`StepClock.next_step_start`,
:mod:`gateway.scheduling.step_aligned_close`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gateway.types import RankKey


def _by_rank(item: tuple[RankKey, int]) -> int:
    return item[0].rank


@dataclass(slots=True)
class _EngineClock:
    model: StepTimeModel
    last_boundary: float | None = None
    last_token: float | None = None
    step_prefill_tokens: float = 0.0
    step_mean_tokens: float = 0.0
    timed: bool = False
    """Whether the step in progress ends with a burst of tokens (some rank decodes in it), so its duration is
    measurable at the next boundary."""
    mean_step_s: float | None = None
    step_figures: dict[RankKey, float] | None = None
    """The ranks with prompt tokens in the step in progress, each with its figure in
    :attr:`StepClock.current_step_tokens`, in rank order (the others carry none and can only stay at none)."""
    step_ranks: int = 0
    """How many ranks the instance has, as the step's start was observed with (what the mean divides by)."""


class StepTimeModel:
    """``duration = a + b * H + c * S`` seconds for one instance's lockstep step (module docstring), fitted by
    exponentially weighted least squares: the sums ``Σ λ^k x xᵀ`` and ``Σ λ^k x d`` over the timed steps
    (``x = (1, H, S)``, features in thousands of tokens) are kept, and the coefficients solve the normal
    equations with a ridge ``ρ`` towards the prior (Hastie, Tibshirani and Friedman, *The Elements of Statistical
    Learning*, 2nd ed., §3.4.1), under ``b, c >= 0``. Unlike recursive least squares it cannot wind up: a
    direction the recent steps do not excite (no step with prefill for a while) fades to the prior instead of
    blowing up.

    Args:
        a_s: prior ``a``, seconds.
        b_s_per_token: prior ``b``, seconds per token.
        c_s_per_token: prior ``c``, seconds per token.
        forgetting: weight ``0 < λ <= 1`` of the past at each timed step (the fit spans about ``1 / (1 - λ)``
            steps).
        prior_steps: the ridge ``ρ``: how many steps' worth of evidence the prior counts for (by default next to
            none: the first timed step replaces the prior, which then only fills directions no step has excited).

    Raises:
        ValueError: a weight out of range.
    """

    def __init__(
        self,
        a_s: float,
        b_s_per_token: float,
        c_s_per_token: float = 0.0,
        *,
        forgetting: float = 0.999,
        prior_steps: float = 1e-9,
    ) -> None:
        if not 0 < forgetting <= 1 or prior_steps <= 0:
            raise ValueError("need 0 < forgetting <= 1 and prior_steps > 0")
        self.prior = (a_s, b_s_per_token * 1000.0, c_s_per_token * 1000.0)
        self.theta = list(self.prior)
        self.forgetting = forgetting
        self.ridge = prior_steps
        self._xx = [[0.0] * 3 for _ in range(3)]
        self._xy = [0.0] * 3
        self._dirty = False  # steps came in since the coefficients were last solved
        self.observations = 0

    def predict(self, heaviest: float, mean: float) -> float:
        """Predicted step duration, seconds, for ``heaviest`` and ``mean`` prefill tokens per rank (>= 0)."""
        if self._dirty:
            self.theta = self._solve()
            self._dirty = False
        a, b, c = self.theta
        return max(0.0, a + b * heaviest / 1000.0 + c * mean / 1000.0)

    def observe(self, duration_s: float, heaviest: float, mean: float) -> None:
        """One timed step: its duration (seconds) and its ``H`` and ``S`` (tokens)."""
        x = (1.0, heaviest / 1000.0, mean / 1000.0)
        lam = self.forgetting
        for i in range(3):
            self._xy[i] = lam * self._xy[i] + x[i] * duration_s
            row = self._xx[i]
            for j in range(3):
                row[j] = lam * row[j] + x[i] * x[j]
        self._dirty = True
        self.observations += 1

    def _solve(self) -> list[float]:
        """The ridge solution with ``b, c >= 0``: the unconstrained one if feasible, else the best feasible one
        with ``b`` or ``c`` (or both) held at 0."""
        best: list[float] | None = None
        best_loss = math.inf
        for free in ((0, 1, 2), (0, 1), (0, 2), (0,)):
            theta = self._solve_on(free)
            if theta is None or theta[1] < 0 or theta[2] < 0:
                continue
            loss = self._loss(theta)
            if loss < best_loss:
                best, best_loss = theta, loss
            if free == (0, 1, 2):
                break  # the unconstrained optimum is feasible
        return best if best is not None else [self.prior[0], 0.0, 0.0]

    def _solve_on(self, free: tuple[int, ...]) -> list[float] | None:
        """Minimise the ridge loss over the coefficients in ``free``, the others at 0 (Gaussian elimination)."""
        n = len(free)
        m = [[self._xx[i][j] + (self.ridge if i == j else 0.0) for j in free] for i in free]
        v = [self._xy[i] + self.ridge * self.prior[i] for i in free]
        for col in range(n):
            pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
            if abs(m[pivot][col]) < 1e-300:
                return None
            m[col], m[pivot] = m[pivot], m[col]
            v[col], v[pivot] = v[pivot], v[col]
            for r in range(col + 1, n):
                f = m[r][col] / m[col][col]
                for k in range(col, n):
                    m[r][k] -= f * m[col][k]
                v[r] -= f * v[col]
        sol = [0.0] * n
        for r in range(n - 1, -1, -1):
            sol[r] = (v[r] - sum(m[r][k] * sol[k] for k in range(r + 1, n))) / m[r][r]
        theta = [0.0, 0.0, 0.0]
        for i, value in zip(free, sol, strict=True):
            theta[i] = value
        return theta

    def _loss(self, theta: list[float]) -> float:
        """The weighted squared error plus the ridge, up to a constant."""
        quad = sum(theta[i] * self._xx[i][j] * theta[j] for i in range(3) for j in range(3))
        lin = sum(theta[i] * self._xy[i] for i in range(3))
        ridge = sum((t - p) ** 2 for t, p in zip(theta, self.prior, strict=True))
        return quad - 2 * lin + self.ridge * ridge

    @property
    def coefficients(self) -> tuple[float, float, float]:
        """``(a, b, c)``: seconds, seconds per token, seconds per token."""
        self.predict(0.0, 0.0)  # solves if a step came in since
        a, b, c = self.theta
        return a, b / 1000.0, c / 1000.0


class StepClock:
    """Per-engine step boundaries and step-duration model.

    Args:
        initial_step_s: step duration assumed for an engine with no observation yet (seconds).
        initial_per_token_s: prefill seconds per token assumed before any is learnt.
        boundary_gap_s: a quiet gap at least this long between two chunks of one engine separates two steps.
        forgetting: the step-time model's forgetting factor (:class:`StepTimeModel`).
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
        forgetting: float = 0.999,
        mean_alpha: float = 0.05,
        max_step_s: float = 30.0,
    ) -> None:
        if initial_step_s <= 0 or not 0 < forgetting <= 1 or not 0 < mean_alpha <= 1:
            raise ValueError("need initial_step_s > 0, 0 < forgetting <= 1 and 0 < mean_alpha <= 1")
        self.initial_step_s = initial_step_s
        self.initial_per_token_s = initial_per_token_s
        self.boundary_gap_s = boundary_gap_s
        self.forgetting = forgetting
        self.mean_alpha = mean_alpha
        self.max_step_s = max_step_s
        self._engines: dict[str, _EngineClock] = {}
        self.current_step_tokens: dict[RankKey, float] = {}
        """Prompt tokens of each rank taken by the step in progress (the rest of its queued tokens wait for the
        next step), as :meth:`observe_tokens` last saw them."""

    def _get(self, engine: str) -> _EngineClock:
        clock = self._engines.get(engine)
        if clock is None:
            model = StepTimeModel(self.initial_step_s, self.initial_per_token_s, forgetting=self.forgetting)
            clock = self._engines[engine] = _EngineClock(model)
        return clock

    def forget(self, engine: str) -> None:
        """Drop everything learnt of ``engine`` (it left the gateway)."""
        self._engines.pop(engine, None)
        for key in [k for k in self.current_step_tokens if k.engine == engine]:
            del self.current_step_tokens[key]

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
            if c.timed and 0 < duration <= self.max_step_s:
                c.model.observe(duration, c.step_prefill_tokens, c.step_mean_tokens)
                m = c.mean_step_s
                c.mean_step_s = duration if m is None else m + self.mean_alpha * (duration - m)
        c.last_boundary = now
        c.step_prefill_tokens = 0.0
        c.step_mean_tokens = 0.0
        c.timed = False
        return True

    def observe_tokens(
        self, engine: str, now: float, queued: Iterable[tuple[RankKey, int, int]], *, decodes_next: bool = False
    ) -> bool:
        """Tokens from ``engine`` arrived at ``now``, with each of its ranks' ``(rank, prompt tokens queued, per-step
        prefill budget)`` as the load view has them after taking the tokens in (every rank of the instance, the same
        ranks at every call, in rank order; tokens >= 0); return whether they began a new step.

        The prompt tokens each rank has queued now, capped at its budget, are what the step in progress
        carries; within one burst of chunks (one step end) the smallest figure seen wins, since first tokens
        arriving in the burst shrink the queue while new dispatches only grow it. The heaviest rank's figure
        and the mean become the step's ``H`` and ``S`` (:meth:`set_step_prefill`).

        ``decodes_next``: some rank of ``engine`` has requests decoding and no prompt tokens queued now, so the
        step in progress ends with tokens and its duration can be measured (module docstring); the burst's last
        observation decides (the scheduler skips the burst's later chunks of decode tokens, which move no queue:
        :meth:`continues_burst`).
        """
        capped: dict[RankKey, float] = {}
        ranks = 0
        for key, tokens, budget in queued:
            ranks += 1
            if tokens:
                capped[key] = min(tokens, budget)
        return self._observe(engine, now, capped, math.inf, ranks, decodes_next)

    def observe_queue(
        self,
        engine: str,
        now: float,
        queued: Mapping[RankKey, int],
        ranks: int,
        budget: int,
        *,
        decodes_next: bool = False,
    ) -> bool:
        """:meth:`observe_tokens` with the queue given sparsely, as the load view keeps it
        (:meth:`~gateway.load.view.LoadView.prefill_queue`): the prompt tokens queued on each rank that has any (read
        at once, not kept), out of ``ranks`` ranks that share one per-step prefill ``budget``. The work per call is
        that of the ranks with tokens queued, not of every rank of the instance."""
        ordered = dict(sorted(queued.items(), key=_by_rank)) if len(queued) > 1 else queued
        return self._observe(engine, now, ordered, budget, ranks, decodes_next)

    def _observe(
        self, engine: str, now: float, queued: Mapping[RankKey, float], budget: float, ranks: int, decodes_next: bool
    ) -> bool:
        """The step clock's reading of ``queued`` (the ranks with tokens queued, in rank order, each capped at
        ``budget``; the other ``ranks`` have none), see :meth:`observe_tokens`. A rank with nothing queued carries
        0 in the step and adds 0.0 to the mean's sum, which leaves a float sum unchanged: summing the ranks with
        tokens alone gives the mean of every rank's figure."""
        new_step = self.on_tokens(engine, now)
        c = self._engines[engine]
        c.timed = decodes_next
        figures = self.current_step_tokens
        step = c.step_figures
        if new_step or step is None:
            if step:
                for key in step:
                    del figures[key]
            step = {}
            for key, tokens in queued.items():
                current = float(min(tokens, budget))
                if current:
                    step[key] = current
            figures.update(step)
            c.step_figures, c.step_ranks = step, ranks
        else:
            fell = False
            for key, value in step.items():
                current = float(min(queued.get(key, 0), budget))
                if current < value:
                    step[key] = figures[key] = current
                    fell = True
            if not fell:
                return new_step
        values = step.values()
        heaviest = max(0.0, max(values, default=0.0))
        self.set_step_prefill(engine, heaviest, sum(values) / c.step_ranks if c.step_ranks else 0.0)
        return new_step

    def continues_burst(self, engine: str, now: float) -> bool:
        """If tokens from ``engine`` at ``now`` belong to the burst in progress (one step end), note them and
        return True; otherwise change nothing and return False (the caller then observes them in full)."""
        c = self._engines.get(engine)
        if c is None or c.last_token is None or now - c.last_token >= self.boundary_gap_s:
            return False
        c.last_token = now
        return True

    def still_timed(self, engine: str, decodes_next: bool) -> None:
        """A request of ``engine`` finished: the step in progress stays timed only if some rank still decodes in
        it (a request whose first token was also its last counted as decoding when that token came)."""
        c = self._engines.get(engine)
        if c is not None:
            c.timed = c.timed and decodes_next

    def set_step_prefill(self, engine: str, prefill_tokens: float, mean_tokens: float | None = None) -> None:
        """The heaviest rank of ``engine`` prefills ``prefill_tokens`` in the step in progress, and its ranks
        ``mean_tokens`` on average (tokens; ``None``: as many as the heaviest, a one-rank instance)."""
        c = self._get(engine)
        c.step_prefill_tokens = prefill_tokens
        c.step_mean_tokens = prefill_tokens if mean_tokens is None else mean_tokens

    def predict(self, engine: str, prefill_tokens: float, mean_tokens: float | None = None) -> float:
        """Predicted duration of a step of ``engine`` whose heaviest rank prefills ``prefill_tokens`` and whose
        ranks ``mean_tokens`` on average (seconds; ``mean_tokens`` ``None``: as many as the heaviest)."""
        mean = prefill_tokens if mean_tokens is None else mean_tokens
        return self._get(engine).model.predict(prefill_tokens, mean)

    def model(self, engine: str) -> StepTimeModel:
        """The step-time model of ``engine`` (fitted, or its prior)."""
        return self._get(engine).model

    def drain_s(self, engine: str, queued: Iterable[tuple[RankKey, int, int]]) -> dict[RankKey, float]:
        """Load in seconds of work: for each rank of ``engine`` (given as ``(rank, prompt tokens queued, per-step
        prefill budget)``), the predicted time to prefill what it has queued, seconds: as many steps as its
        queue fills budgets (at least one when anything is queued), each as long as the step-time model predicts
        for the instance's next step (its heaviest and mean rank figures, each rank capped at its budget).
        The load estimate for upper-level schedulers FairBatching's abstract offers (arXiv 2510.14392), per DP rank."""
        ranks = list(queued)
        if not ranks:
            return {}
        firsts = [min(tokens, budget) for _, tokens, budget in ranks]
        step = self._get(engine).model.predict(max(firsts), sum(firsts) / len(firsts))
        return {key: 0.0 if tokens <= 0 else max(1.0, tokens / budget) * step for key, tokens, budget in ranks}

    def mean_step_s(self) -> float:
        """Mean step time over the engines whose steps were timed, each an exponentially weighted average of its
        timed steps' boundary-to-boundary times (seconds); ``initial_step_s`` before any step was timed."""
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
        return c.last_boundary + c.model.predict(c.step_prefill_tokens, c.step_mean_tokens)

    def time_to_next_step(self, engine: str, now: float) -> float:
        """Seconds until ``engine`` is predicted to start its next step (0 when overdue or never seen)."""
        start = self.next_step_start(engine)
        return 0.0 if start is None else max(0.0, start - now)

    def current_step_prefill_tokens(self, engine: str) -> float:
        """Most prefill tokens one rank of ``engine`` carries in the step in progress (as seen at its start)."""
        return self._get(engine).step_prefill_tokens
