"""The result of placing a window's batch (the rest of the scheduler's vocabulary is in :mod:`gateway.types`).

Pure data; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.types import PendingRequest, RankKey


@dataclass(slots=True)
class Allocation:
    """The result of placing a window's batch.

    Attributes:
        assigned: ``(request, rank)`` pairs to dispatch now.
        deferred: requests that fit nowhere this window; they wait for the next one.
        unplaceable: requests no usable rank serves at all (the caller answers them with an error).
    """

    assigned: list[tuple[PendingRequest, RankKey]] = field(default_factory=list)
    deferred: list[PendingRequest] = field(default_factory=list)
    unplaceable: list[PendingRequest] = field(default_factory=list)
