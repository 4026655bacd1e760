"""Indexes over live ranks, so an immediate policy places a request in O(log ranks) instead of scanning them all.

Through the scheduler a policy may read the load view's entries kept current in place (:class:`LiveRanks`, the
scheduler's :class:`~gateway.load.live.LiveLoads`) instead of a fresh snapshot: between two requests only the
ranks whose entry changed are handed to it, by position. What the policies keep, per model:

- :class:`Candidates`: the usable ranks serving the model, in snapshot order (what
  :func:`~gateway.scheduling.baselines.base.serving` returns from the snapshot), built again when a rank's
  usability changes.
- :class:`LoadOrder`: the candidates sorted by ``(load, candidate index)``, each change a removal and an insertion
  (binary search and a memmove); the lowest load's first candidate from a rotating start is one more binary
  search (:func:`first_lowest_from`), and the ties of smg's expected wait a prefix of the order
  (:func:`~gateway.scheduling.baselines.least_load.least_wait_tie`).
- :class:`LoadSum`: the sum of a load over the candidates, kept as a whole number while every figure is one (so
  exactly the float ``sum`` gives in any order), summed again in candidate order otherwise.

Each policy's ``choose_live`` makes the same choice, drawing the same random numbers, as its ``choose`` on the
snapshot (``tests/unit/test_immediate_live.py``).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

from gateway.types import RankKey, RankLoad


class LiveRanks(Protocol):
    """The load view's entries of the ranks a policy places on, kept current in place between requests
    (:class:`gateway.load.live.LiveLoads`): :attr:`loads` equals the snapshot the policy's ``choose`` would get."""

    @property
    def loads(self) -> Sequence[RankLoad]:
        """The entries, in snapshot order; a rank keeps its position while :attr:`layout` stands."""
        ...

    @property
    def layout(self) -> int:
        """Changes whenever positions or any rank's usability change."""
        ...

    def subscribe(self) -> set[int]:
        """A set of the positions whose entry changed since its owner last emptied it."""
        ...


class Candidates:
    """The usable ranks serving ``model`` among ``live``'s, in snapshot order.

    Attributes:
        positions: each candidate's position in ``live.loads``, in order.
        index: each candidate's index in :attr:`positions`, by rank.
        slot: for each position in ``live.loads``, the candidate index there, or -1.
    """

    def __init__(self, live: LiveRanks, model: str) -> None:
        self.live = live
        self.model = model
        self.layout = -1
        self.positions: list[int] = []
        self.index: dict[RankKey, int] = {}
        self.slot: list[int] = []

    def sync(self) -> bool:
        """Build the candidates again if the live layout changed; return whether it did."""
        live = self.live
        if self.layout == live.layout:
            return False
        loads, model = live.loads, self.model
        self.positions = [i for i, r in enumerate(loads) if r.usable and model in r.models]
        self.index = {loads[p].key: j for j, p in enumerate(self.positions)}
        self.slot = [-1] * len(loads)
        for j, p in enumerate(self.positions):
            self.slot[p] = j
        self.layout = live.layout
        return True

    def __len__(self) -> int:
        return len(self.positions)

    def load(self, j: int) -> RankLoad:
        """Candidate ``j``'s current entry."""
        return self.live.loads[self.positions[j]]


K = TypeVar("K", float, tuple[float, float])


class LoadOrder(Generic[K]):
    """``model``'s candidates sorted by ``(key(entry), candidate index)``.

    Attributes:
        candidates: the candidates.
        order: ``(key, candidate index)`` pairs, ascending.
    """

    def __init__(self, live: LiveRanks, model: str, key: Callable[[RankLoad], K]) -> None:
        self.candidates = Candidates(live, model)
        self._key: Callable[[RankLoad], K] = key
        self._dirty = live.subscribe()
        self._values: list[K] = []
        self.order: list[tuple[K, int]] = []

    def sync(self) -> Candidates:
        """Take in the changes since the last call: O(changed × log candidates), or a sort after a layout change."""
        candidates, key, dirty = self.candidates, self._key, self._dirty
        if candidates.sync():
            loads = candidates.live.loads
            self._values = [key(loads[p]) for p in candidates.positions]
            self.order = sorted(zip(self._values, range(len(self._values)), strict=True))
            dirty.clear()
        elif dirty:
            loads, slot, values, order = candidates.live.loads, candidates.slot, self._values, self.order
            for p in dirty:
                j = slot[p]
                if j < 0:
                    continue
                new, old = key(loads[p]), values[j]
                if new == old:
                    continue
                del order[bisect.bisect_left(order, (old, j))]
                bisect.insort(order, (new, j))
                values[j] = new
            dirty.clear()
        return candidates


class LoadSum:
    """``sum(key(r) for r in candidates)`` over ``model``'s candidates, the same float as that expression."""

    def __init__(self, live: LiveRanks, model: str, key: Callable[[RankLoad], float]) -> None:
        self.candidates = Candidates(live, model)
        self._key = key
        self._dirty = live.subscribe()
        self._values: list[float] = []
        self._whole = 0
        """Sum of the whole figures."""
        self._magnitude = 0
        """Sum of the whole figures' magnitudes: below 2**53, every partial sum of them is exact."""
        self._fractional = 0
        """How many figures are not whole (or not finite)."""

    def _add(self, value: float, sign: int) -> None:
        if math.isfinite(value) and value.is_integer():
            self._whole += sign * int(value)
            self._magnitude += sign * abs(int(value))
        else:
            self._fractional += sign

    def sync(self) -> Candidates:
        """Take in the changes since the last call: O(changed), or O(candidates) after a layout change."""
        candidates, key, dirty = self.candidates, self._key, self._dirty
        if candidates.sync():
            loads = candidates.live.loads
            self._values = [key(loads[p]) for p in candidates.positions]
            self._whole = self._magnitude = self._fractional = 0
            for value in self._values:
                self._add(value, 1)
            dirty.clear()
        elif dirty:
            loads, slot, values = candidates.live.loads, candidates.slot, self._values
            for p in dirty:
                j = slot[p]
                if j >= 0:
                    self._add(values[j], -1)
                    values[j] = key(loads[p])
                    self._add(values[j], 1)
            dirty.clear()
        return candidates

    def total(self) -> float:
        """The sum, as of the last :meth:`sync`."""
        if self._fractional or self._magnitude >= 2**53:
            return sum(self._values)
        return float(self._whole)


def first_lowest_from(order: list[tuple[float, int]], start: int) -> int:
    """The first candidate index at or after ``start`` whose key is the lowest, else the first overall (the
    choice of :class:`~gateway.scheduling.baselines.base.Rotating`). ``order`` must not be empty."""
    low = order[0][0]
    i = bisect.bisect_left(order, (low, start))
    return order[i][1] if i < len(order) and order[i][0] == low else order[0][1]


T = TypeVar("T")


class PerModel(Generic[T]):
    """A policy's structures for each model, over the one :class:`LiveRanks` it is handed (built at a model's
    first request, all dropped if another one comes)."""

    def __init__(self, build: Callable[[LiveRanks, str], T]) -> None:
        self._build = build
        self._live: LiveRanks | None = None
        self._items: dict[str, T] = {}

    def get(self, live: LiveRanks, model: str) -> T:
        if live is not self._live:
            self._live, self._items = live, {}
        item = self._items.get(model)
        if item is None:
            item = self._items[model] = self._build(live, model)
        return item
