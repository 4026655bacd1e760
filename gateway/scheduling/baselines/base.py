"""What every immediate-dispatch policy is: a choice of one DP rank per request from a load snapshot.

- :class:`ImmediatePolicy`: the protocol the scheduler calls, ``choose(request, ranks) -> rank or None``;
  :class:`LivePolicy`: a policy that also chooses from the live ranks the scheduler keeps current, in
  O(log ranks) (:mod:`.indexed`).
- :class:`PolicyContext`: what a policy's factory gets: the seed, and the scheduler's :class:`StepPlacement`
  for a policy that places by the engines' step phase.
- :func:`serving`, :class:`Rotating`: the helpers most policies build on (the usable ranks serving a request's
  model; the minimum of a load function with ties broken by a rotating start).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from gateway.scheduling.baselines.indexed import LiveRanks, LoadOrder, PerModel, first_lowest_from
from gateway.types import PendingRequest, RankKey, RankLoad


class ImmediatePolicy(Protocol):
    """Chooses a DP rank for one request, or ``None`` when no usable rank serves its model."""

    name: str

    def choose(self, request: PendingRequest, ranks: Sequence[RankLoad]) -> RankKey | None: ...


@runtime_checkable
class LivePolicy(ImmediatePolicy, Protocol):
    """A policy that can also choose from the live ranks the scheduler keeps current between requests
    (:class:`~gateway.scheduling.baselines.indexed.LiveRanks`), reading only what changed since its last choice;
    ``choose_live`` makes the choice ``choose`` would make on the snapshot, with the same effect on the policy's
    state (the same random draws, the same rotation), so one instance may be called both ways."""

    def choose_live(self, request: PendingRequest, live: LiveRanks) -> RankKey | None: ...


class StepPlacement(Protocol):
    """The scheduler's step-aware placement of one request: its batch allocator (``phase_aware``, with the step
    clock the scheduler feeds with token arrivals and the prompt tokens each rank's current step took) applied to a
    batch of one at ``now``, with no capacity bound. Built by the scheduler
    (:class:`gateway.scheduling.scheduler.PhasePlacement`)."""

    def place(self, request: PendingRequest, ranks: Sequence[RankLoad], now: float) -> RankKey | None: ...


@dataclass(frozen=True, slots=True)
class PolicyContext:
    """What an immediate-dispatch policy's factory gets (:data:`gateway.scheduling.baselines.IMMEDIATE_POLICIES`).

    Attributes:
        seed: seed of randomised policies (``baselines.seed``).
        steps: the scheduler's step-aware placement; ``None`` outside a scheduler.
    """

    seed: int = 0
    steps: StepPlacement | None = None


def serving(request: PendingRequest, ranks: Sequence[RankLoad]) -> list[RankLoad]:
    """The usable ranks that serve the request's model."""
    return [r for r in ranks if r.usable and request.model in r.models]


class Rotating:
    """Base of the policies that pick the minimum of a load function, ties broken by a rotating start."""

    name = "abstract"

    def __init__(self) -> None:
        self._next = 0
        self._orders: PerModel[LoadOrder[float]] | None = None

    def _pick_live(self, request: PendingRequest, live: LiveRanks, load: Callable[[RankLoad], float]) -> RankKey | None:
        """:meth:`_pick` over the live candidates serving the request's model, from their order by ``load``
        (O(log candidates) and the changes since the last call)."""
        if self._orders is None:
            self._orders = PerModel(lambda ranks, model: LoadOrder(ranks, model, load))
        order = self._orders.get(live, request.model)
        candidates = order.sync()
        n = len(candidates)
        if not n:
            return None
        start = self._next % n
        best = first_lowest_from(order.order, start)
        self._next = start + (best - start) % n + 1
        return candidates.load(best).key

    def _pick(self, candidates: list[RankLoad], load: Callable[[RankLoad], float]) -> RankKey | None:
        """The first candidate of lowest load from the rotating start on (wrapping round); one call of ``load``
        per candidate, the search for the lowest in C."""
        if not candidates:
            return None
        n = len(candidates)
        start = self._next % n
        loads = [load(r) for r in candidates]
        low = min(loads)
        try:
            best = loads.index(low, start)
        except ValueError:
            best = loads.index(low)
        self._next = start + (best - start) % n + 1
        return candidates[best].key
