"""Engine and DP-rank health: circuit breakers fed by active ``/health`` probes and by failed requests.

Pure state with time passed in (the asyncio prober lives in :mod:`gateway.load.prober`).

One :class:`CircuitBreaker` guards each engine and one each DP rank (Nygard, "Release It!", 2007, ch. 5;
the closed → open → half-open cycle):

- **closed**: traffic flows; consecutive failures are counted and any success resets the count.
- **open**: after ``failure_threshold`` consecutive failures no new request is placed there for ``open_s``.
- **half-open**: the wait is over and one trial decides: for a DP rank, the next request placed there (one at
  a time); for an engine, the next active ``/health`` probe. Its success closes the breaker; its failure opens
  it again for twice as long, up to ``max_open_s``.

What counts against which breaker (see :meth:`HealthBook.record_failure` and the ``blame`` of each
:class:`~gateway.errors.UpstreamError`): an engine that cannot be reached, or
fails its ``/health`` probe, or whose connection breaks in the middle of an answer, is an engine failure (all its
ranks stop taking requests); an HTTP 5xx, a timeout, or a stream that ends early or carries garbage on a whole
connection is a failure of the DP rank that served it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from gateway.config import HealthConfig
from gateway.types import FailureScope, RankKey


class BreakerState(enum.Enum):
    """A circuit breaker's state."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(slots=True)
class CircuitBreaker:
    """One circuit breaker (see the module docstring).

    Args:
        failure_threshold: consecutive failures that open it.
        open_s: first open period, seconds.
        max_open_s: longest open period, seconds.
        trial_by_request: whether a request may be the half-open trial (DP ranks); when ``False`` only an
            active probe closes it (engines, whose ``/health`` is probed).
    """

    failure_threshold: int
    open_s: float
    max_open_s: float
    trial_by_request: bool = True
    failures: int = 0
    """Consecutive failures while closed."""
    open_until: float | None = None
    """End of the current open period; ``None`` while closed."""
    open_for_s: float = 0.0
    """Length of the current (or last) open period, seconds."""
    trial_in_flight: bool = False
    """Half-open only: a trial request is under way, so no other one is let through."""
    opened_total: int = 0
    """How many times it opened (for tests and logs)."""
    ever_succeeded: bool = False
    """Whether anything behind it ever succeeded: until then one failure opens it (an engine never seen
    healthy, e.g. down when the gateway starts, is not trusted with traffic)."""

    def state(self, now: float) -> BreakerState:
        """The state at ``now``."""
        if self.open_until is None:
            return BreakerState.CLOSED
        return BreakerState.OPEN if now < self.open_until else BreakerState.HALF_OPEN

    def allows(self, now: float) -> bool:
        """Whether a new request may be placed behind this breaker at ``now``."""
        state = self.state(now)
        if state is BreakerState.HALF_OPEN:
            return self.trial_by_request and not self.trial_in_flight
        return state is BreakerState.CLOSED

    def on_dispatch(self, now: float) -> None:
        """A request was placed behind the breaker: when half-open, it is the trial."""
        if self.state(now) is BreakerState.HALF_OPEN:
            self.trial_in_flight = True

    def record_success(self, now: float) -> None:
        """A request or probe succeeded: close (ignored while open: the wait is not over)."""
        if self.state(now) is BreakerState.OPEN:
            return
        self.failures = 0
        self.open_until = None
        self.trial_in_flight = False
        self.ever_succeeded = True

    def record_failure(self, now: float) -> None:
        """A request or probe failed: count it, and open when the threshold is reached or a trial failed."""
        state = self.state(now)
        self.trial_in_flight = False
        if state is BreakerState.OPEN:
            return  # a request sent before it opened
        if state is BreakerState.HALF_OPEN:
            self._open(now, min(self.max_open_s, self.open_for_s * 2))
            return
        self.failures += 1
        if self.failures >= self.failure_threshold or not self.ever_succeeded:
            self._open(now, self.open_s)

    def _open(self, now: float, duration_s: float) -> None:
        self.open_for_s = duration_s
        self.open_until = now + duration_s
        self.failures = 0
        self.opened_total += 1


class HealthBook:
    """The breakers of every engine and DP rank.

    Args:
        ranks: every DP rank.
        config: thresholds and open periods.
    """

    def __init__(self, ranks: Iterable[RankKey], config: HealthConfig) -> None:
        self.config = config
        self.listener: Callable[[RankKey, FailureScope | None, float], None] | None = None
        """Told of each request outcome recorded on a rank (scope ``None`` for a success) with its time: a front
        door forwards them to its scheduler service, whose breakers then see what every front door sees."""
        self._ranks: dict[RankKey, CircuitBreaker] = {}
        self._engines: dict[str, CircuitBreaker] = {}
        self._engine_ranks: dict[str, list[RankKey]] = {}
        self._held: set[str] = set()
        """Engines that take no new requests whatever their breakers say (draining, or added and not probed yet)."""
        for key in ranks:
            self._ranks[key] = self._new(trial_by_request=True)
            self._engines.setdefault(key.engine, self._new(trial_by_request=False))
            self._engine_ranks.setdefault(key.engine, []).append(key)
        self._unsure_ranks: set[RankKey] = set()
        """Ranks whose own breaker is not closed."""
        self._unsure_engines: set[str] = set()
        """Engines whose breaker is not closed."""

    def add_engine(self, name: str, dp_size: int, *, held: bool = True) -> None:
        """Add the breakers of engine ``name`` and its ``dp_size`` DP ranks (closed); ``held`` keeps new requests
        away until :meth:`hold` releases it (an engine added at runtime waits for its first probe).

        Raises:
            ValueError: the engine is already known.
        """
        if name in self._engines:
            raise ValueError(f"engine {name!r} already has breakers")
        self._engines[name] = self._new(trial_by_request=False)
        keys = [RankKey(name, rank) for rank in range(dp_size)]
        for key in keys:
            self._ranks[key] = self._new(trial_by_request=True)
        self._engine_ranks[name] = keys
        if held:
            self._held.add(name)

    def remove_engine(self, name: str) -> None:
        """Drop the breakers of engine ``name`` and its ranks.

        Raises:
            KeyError: unknown engine.
        """
        del self._engines[name]
        for key in self._engine_ranks.pop(name):
            del self._ranks[key]
            self._unsure_ranks.discard(key)
        self._unsure_engines.discard(name)
        self._held.discard(name)

    def hold(self, name: str, held: bool) -> None:
        """Keep new requests off engine ``name`` (``held``), or let them through again as its breakers allow: a
        draining engine is held; requests in flight there are not affected.

        Raises:
            KeyError: unknown engine.
        """
        if name not in self._engines:
            raise KeyError(name)
        if held:
            self._held.add(name)
        else:
            self._held.discard(name)

    def held(self, name: str) -> bool:
        """Whether engine ``name`` is held (:meth:`hold`)."""
        return name in self._held

    def _new(self, *, trial_by_request: bool) -> CircuitBreaker:
        c = self.config
        return CircuitBreaker(c.failure_threshold, c.open_s, c.max_open_s, trial_by_request)

    @property
    def engines(self) -> list[str]:
        """Engine names."""
        return list(self._engines)

    def engine(self, name: str) -> CircuitBreaker:
        """The breaker of engine ``name``.

        Raises:
            KeyError: unknown engine.
        """
        return self._engines[name]

    def rank(self, key: RankKey) -> CircuitBreaker:
        """The breaker of DP rank ``key``.

        Raises:
            KeyError: unknown rank.
        """
        return self._ranks[key]

    def usable(self, key: RankKey, now: float) -> bool:
        """Whether a new request may be placed on ``key`` at ``now`` (its engine's and its own breaker allow it)."""
        if self._held and key.engine in self._held:
            return False
        return self._engines[key.engine].allows(now) and self._ranks[key].allows(now)

    def unsure(self) -> Collection[RankKey]:
        """The ranks :meth:`usable` may refuse: those whose own breaker or whose engine's is not closed, and those
        of a held engine. A closed breaker allows every request whatever the time, and only this book's
        ``record_*`` methods (and :meth:`hold`) change that, so every other rank is usable until one of them is
        called (the load view asks :meth:`usable` of these ranks only). Read it at once; do not keep or change
        it."""
        if not self._unsure_engines and not self._held:
            return self._unsure_ranks
        out = set(self._unsure_ranks)
        for name in self._unsure_engines | self._held:
            out.update(self._engine_ranks[name])
        return out

    def _track(self, key: RankKey) -> None:
        """Note whether ``key``'s breaker and its engine's are closed (:meth:`unsure`)."""
        if self._ranks[key].open_until is None:
            self._unsure_ranks.discard(key)
        else:
            self._unsure_ranks.add(key)
        self._track_engine(key.engine)

    def _track_engine(self, name: str) -> None:
        if self._engines[name].open_until is None:
            self._unsure_engines.discard(name)
        else:
            self._unsure_engines.add(name)

    def engine_up(self, name: str, now: float) -> bool:
        """Whether engine ``name`` takes traffic (its breaker is not open)."""
        return self._engines[name].state(now) is not BreakerState.OPEN

    def on_dispatch(self, key: RankKey, now: float) -> None:
        """A request was placed on ``key`` (it becomes the trial of a half-open breaker)."""
        self._engines[key.engine].on_dispatch(now)
        self._ranks[key].on_dispatch(now)

    def record_success(self, key: RankKey, now: float) -> None:
        """A request on ``key`` got its answer started (status 200 and a first byte)."""
        self._engines[key.engine].record_success(now)
        self._ranks[key].record_success(now)
        self._track(key)
        if self.listener is not None:
            self.listener(key, None, now)

    def record_failure(self, key: RankKey, scope: FailureScope, now: float) -> None:
        """A request on ``key`` failed; ``scope`` says whether the engine or only the rank is to blame (an
        :class:`~gateway.errors.UpstreamError`'s ``blame``).

        Raises:
            ValueError: ``scope`` is neither (only from callers mypy does not check).
        """
        if scope == "engine":
            self._engines[key.engine].record_failure(now)
            self._ranks[key].trial_in_flight = False
        elif scope == "rank":
            self._ranks[key].record_failure(now)
            self._engines[key.engine].trial_in_flight = False
        else:
            raise ValueError(f"scope must be 'engine' or 'rank', got {scope!r}")
        self._track(key)
        if self.listener is not None:
            self.listener(key, scope, now)

    def record_probe(self, name: str, ok: bool, now: float) -> None:
        """An active ``/health`` probe of engine ``name`` succeeded or failed."""
        breaker = self._engines[name]
        if ok:
            breaker.record_success(now)
        else:
            breaker.record_failure(now)
        self._track_engine(name)

    def describe(self, now: float) -> dict[str, dict[str, object]]:
        """Per engine: breaker state and the DP ranks whose own breaker is not closed (for ``/ready``)."""
        out: dict[str, dict[str, object]] = {
            name: {"state": breaker.state(now).value, "unhealthy_ranks": []} for name, breaker in self._engines.items()
        }
        for key, breaker in self._ranks.items():
            if breaker.state(now) is not BreakerState.CLOSED:
                ranks = out[key.engine]["unhealthy_ranks"]
                assert isinstance(ranks, list)
                ranks.append(key.rank)
        return out


@dataclass(slots=True)
class RetryThrottle:
    """Retry throttling (gRFC A6, "Retry throttling", as in gRPC): retries stop while too many tries fail.

    Args:
        max_tokens: the token count's start and maximum.
        ratio: tokens a successful try gives back (a failed one takes one).
    """

    max_tokens: float
    ratio: float
    tokens: float = -1.0

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.max_tokens

    def on_success(self) -> None:
        """A try succeeded."""
        self.tokens = min(self.max_tokens, self.tokens + self.ratio)

    def on_failure(self) -> None:
        """A try failed."""
        self.tokens = max(0.0, self.tokens - 1.0)

    def allows_retry(self) -> bool:
        """Whether a failed try may be retried now: more than half the maximum tokens are left."""
        return self.tokens > self.max_tokens / 2
