"""What every immediate-dispatch policy is: a choice of one DP rank per request from a load snapshot.

- :class:`ImmediatePolicy`: the protocol the scheduler calls, ``choose(request, ranks) -> rank or None``.
- :func:`serving`, :class:`Rotating`: the helpers most policies build on (the usable ranks serving a request's
  model; the minimum of a load function with ties broken by a rotating start).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from gateway.types import PendingRequest, RankKey, RankLoad


class ImmediatePolicy(Protocol):
    """Chooses a DP rank for one request, or ``None`` when no usable rank serves its model."""

    name: str

    def choose(self, request: PendingRequest, ranks: Sequence[RankLoad]) -> RankKey | None: ...


def serving(request: PendingRequest, ranks: Sequence[RankLoad]) -> list[RankLoad]:
    """The usable ranks that serve the request's model."""
    return [r for r in ranks if r.usable and request.model in r.models]


class Rotating:
    """Base of the policies that pick the minimum of a load function, ties broken by a rotating start."""

    name = "abstract"

    def __init__(self) -> None:
        self._next = 0

    def _pick(self, candidates: list[RankLoad], load: Callable[[RankLoad], float]) -> RankKey | None:
        if not candidates:
            return None
        n = len(candidates)
        start = self._next % n
        rotated = candidates[start:] + candidates[:start]
        best = min(range(n), key=lambda i: load(rotated[i]))
        self._next = start + best + 1
        return rotated[best].key
