"""A snapshot of some ranks' load kept current in place, for the policies that place one request at a time.

:meth:`LoadView.snapshot <gateway.load.view.LoadView.snapshot>` hands out a new list of every rank's entry: O(ranks)
per request, however few ranks changed since the last one. :class:`LiveLoads` keeps one such list and, at each
:meth:`~LiveLoads.refresh`, replaces only the entries of the ranks the view rebuilt since (its
:class:`~gateway.load.view.RankWatch`), telling its subscribers which positions changed, so an immediate policy
can keep its own index of the ranks (by load, by eligibility) up to date in O(changed × log ranks)
(:mod:`gateway.scheduling.baselines.indexed`). After a refresh, :attr:`~LiveLoads.loads` equals what
``snapshot(now, roles)`` would return.
"""

from __future__ import annotations

from gateway.load.view import LoadView
from gateway.types import RankKey, RankLoad


class LiveLoads:
    """The entries of the ranks of engines with one of ``roles``, in snapshot order, kept current in place.

    Args:
        view: the load view.
        roles: the engine roles whose ranks it holds (:data:`~gateway.load.view.PREFILL_ROLES`, ...).

    Attributes:
        loads: the entries, in the order of :meth:`LoadView.snapshot <gateway.load.view.LoadView.snapshot>`; a
            rank keeps its position while :attr:`layout` stands. Read it during a call; do not keep or change it.
        layout: changes whenever the ranks' positions or any rank's usability change (a subscriber's index of
            eligible ranks must then be built again); starts at 0, before the first refresh.
    """

    def __init__(self, view: LoadView, roles: frozenset[str]) -> None:
        self._view = view
        self._roles = roles
        self._watch = view.watch()
        self._subscribers: list[set[int]] = []
        self._position: dict[RankKey, int] = {}
        self.loads: list[RankLoad] = []
        self.layout = 0

    def subscribe(self) -> set[int]:
        """A set that each :meth:`refresh` fills with the positions in :attr:`loads` whose entry it replaced; its
        owner empties it as it takes them in."""
        dirty: set[int] = set()
        self._subscribers.append(dirty)
        return dirty

    def refresh(self, now: float) -> None:
        """Bring :attr:`loads` up to ``now`` (:meth:`LoadView.refresh <gateway.load.view.LoadView.refresh>`):
        O(engines + ranks changed since the last refresh)."""
        if not self.layout or self._watch.reset:
            self._rebuild(now)
            return
        view = self._view
        view.refresh(now)
        changed = self._watch.keys
        if not changed:
            return
        loads, position, subscribers = self.loads, self._position, self._subscribers
        moved = False
        for key in changed:
            i = position.get(key)
            if i is None:
                continue  # a rank of another role
            new = view.entry(key)
            old = loads[i]
            if new is old:
                continue
            loads[i] = new
            moved = moved or new.usable != old.usable
            for dirty in subscribers:
                dirty.add(i)
        changed.clear()
        if moved:
            self.layout += 1

    def _rebuild(self, now: float) -> None:
        """Take the whole snapshot again (the first refresh; any change of the view's set of ranks)."""
        self.loads = self._view.snapshot(now, self._roles)
        self._position = {load.key: i for i, load in enumerate(self.loads)}
        self._watch.keys.clear()
        self._watch.reset = False
        for dirty in self._subscribers:
            dirty.clear()
        self.layout += 1
