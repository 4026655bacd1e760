"""Load-aware global allocation of a window's batch across DP ranks (policy ``sbs``).

Prefill **water-filling** (our reading of Staggered Batch Scheduling, Tian et al., arXiv 2512.16134, §"Load-Aware
Global Allocation"; see ``docs/design.md`` §2.5): every DP rank has a per-step prefill capacity (its token budget)
of which ``queued_prefill_tokens`` are already taken. The window's requests are sorted by prompt length, longest first,
and each is poured into the rank with the lowest filled level among those it fits in, so that the maximum
per-rank prefill load of the next lockstep step (the step's makespan) stays as low as possible. Ties in the
level, common when ranks are idle, are broken by decode load: fewest running requests, then least KV usage.
What fits nowhere waits for the next window instead of queuing inside an engine; a request that has waited
``max_wait_s`` is placed on the least-filled rank regardless, so nothing starves.

Requests deferred before are placed first (:func:`placement_order`). Longest-first alone passes over short
requests again and again during a burst (``bench/results/decisions.md#deferred-first``).

A rank's capacity is ``queue_steps`` budgets, not one: the gateway cannot see step boundaries, so the tokens it
counts as queued include the step in progress, and the engine starts its next step the moment one ends, before
the gateway hears of it. With one budget of capacity, requests held back would miss every next step
(``bench/results/decisions.md#queue-steps``).

A prompt longer than a rank's whole capacity fits only a rank with nothing queued: chunked prefill then spreads
it over several steps.

The capacity is also at least ``min_queue_tokens`` prompt tokens, whatever the budget. With a small chunked-prefill
budget, two budgets would leave every longer prompt waiting for an idle rank
(``bench/results/decisions.md#min-queue-tokens``).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from gateway.scheduling.decode import DecodeRanker, decode_ranker
from gateway.scheduling.types import Allocation
from gateway.types import PendingRequest, RankKey, RankLoad

if TYPE_CHECKING:
    from gateway.config import DecodeConfig, WaterFillConfig

DEFAULT_QUEUE_STEPS = 2.0
"""Default rank capacity, in per-step prefill budgets: the step in progress plus the next one."""

KV_HIGH_WATERMARK = 0.95
"""A rank whose reported KV usage is at or above this fraction takes no new request unless forced."""


def decode_load_key(load: RankLoad) -> tuple[float, float, float]:
    """Sort key of a rank's decode load: running requests, then KV usage (0–1), then KV tokens."""
    return (load.running, load.kv_usage if load.kv_usage is not None else 0.0, load.kv_tokens)


def capacity_tokens(load: RankLoad, queue_steps: float, min_tokens: float = 0.0) -> float:
    """A rank's prefill capacity, prompt tokens: ``queue_steps`` of its per-step budgets, at least ``min_tokens``."""
    return max(load.prefill_budget * queue_steps, min_tokens)


def fits(level: float, tokens: int, load: RankLoad, queue_steps: float, min_tokens: float = 0.0) -> bool:
    """Whether ``tokens`` more prompt tokens fit a rank filled to ``level`` (capacity: :func:`capacity_tokens`); a
    rank with nothing queued takes any prompt, one at or above the KV watermark none."""
    if load.kv_usage is not None and load.kv_usage >= KV_HIGH_WATERMARK:
        return False
    return level + tokens <= capacity_tokens(load, queue_steps, min_tokens) or level <= 0


def placement_order(batch: Iterable[PendingRequest], shortest_first: bool = False) -> list[PendingRequest]:
    """The order in which a window's requests are placed: requests deferred by more windows first (so what
    waited is not passed over again by newer arrivals), then longest prompt first (water-filling), then by
    arrival. With ``shortest_first``: shortest prompt first whatever waited, then by arrival (only ``max_wait_s``
    bounds how long a long prompt can be passed over)."""
    if shortest_first:
        return sorted(batch, key=lambda q: (q.prompt_tokens, q.arrival_s))
    return sorted(batch, key=lambda q: (-q.deferrals, -q.prompt_tokens, q.arrival_s))


def free_prefill_capacity(
    ranks: Iterable[RankLoad], queue_steps: float = DEFAULT_QUEUE_STEPS, min_tokens: float = 0.0
) -> float:
    """Total prefill tokens the usable ranks can still take (tokens, >= 0); see :func:`water_fill`."""
    return sum(
        max(0.0, capacity_tokens(r, queue_steps, min_tokens) - r.queued_prefill_tokens) for r in ranks if r.usable
    )


def water_fill(
    batch: Sequence[PendingRequest],
    ranks: Sequence[RankLoad],
    *,
    now: float,
    max_wait_s: float,
    queue_steps: float = DEFAULT_QUEUE_STEPS,
    min_queue_tokens: float = 0.0,
    decode: DecodeRanker | None = None,
    shortest_first: bool = False,
) -> Allocation:
    """Place a window's batch on DP ranks by prefill water-filling.

    Each request goes to the fitting rank with the lowest ``(level, decode key, rank)``. The ranks serving a
    model are kept sorted by that key within groups of equal capacity (:class:`_Levels`), so a request costs
    O(log n) comparisons plus an O(n) memmove per group, n the ranks serving its model, instead of a scan.

    Args:
        batch: the window's requests, in arrival order.
        ranks: a snapshot of every DP rank's load.
        now: current time on the caller's clock (seconds), to age requests.
        max_wait_s: a request older than this is placed even where it does not fit (seconds).
        queue_steps: a rank's capacity in per-step prefill budgets (> 0; ``inf`` places everything at once).
        min_queue_tokens: a rank's capacity is at least this many prompt tokens (module docstring).
        decode: decode-aware choice (:mod:`gateway.scheduling.decode`): ties in the level go to non-outlier
            ranks first, then by its lexicographic key; ``None`` breaks them by running requests, then KV usage.
        shortest_first: place the shortest prompts first (:func:`placement_order`).

    Returns:
        An :class:`Allocation`: assigned pairs (longest prompt first), deferred requests (arrival order), and
        requests that no usable rank serves.
    """
    result = Allocation()
    level = {r.key: r.queued_prefill_tokens for r in ranks}
    usable = [r for r in ranks if r.usable]
    by_model: dict[str, _Levels] = {}
    for request in placement_order(batch, shortest_first):
        levels = by_model.get(request.model)
        if levels is None:
            serving = [r for r in usable if request.model in r.models]
            levels = by_model[request.model] = _Levels(serving, level, queue_steps, min_queue_tokens, decode)
        if not levels.serving:
            result.unplaceable.append(request)
            continue
        tokens = request.prompt_tokens
        young = now - request.arrival_s < max_wait_s
        if young and tokens > levels.headroom():
            result.deferred.append(request)
            continue
        best = levels.best_fitting(tokens)
        if best is None:
            if young:
                result.deferred.append(request)
                continue
            best = levels.best_of_all()
        if decode is not None:
            decode.place(best.key, tokens)
        level[best.key] += tokens
        for other in by_model.values():
            other.moved(best)
        result.assigned.append((request, best.key))
    result.deferred.sort(key=lambda q: q.arrival_s)
    return result


class _Levels:
    """The ranks serving one model, for :func:`water_fill`: those that may take a request (below the KV
    watermark) in groups of equal capacity, each sorted by ``(level, tie-break, rank)``, where the tie-break is
    the decode-aware key without its outlier flag (the flag moves with the fences: it is read while walking the
    ranks of the lowest level) or :func:`decode_load_key` without the decode-aware choice."""

    def __init__(
        self,
        serving: list[RankLoad],
        level: dict[RankKey, float],
        queue_steps: float,
        min_tokens: float,
        decode: DecodeRanker | None,
    ) -> None:
        self.serving = serving
        self.level = level
        self.decode = decode
        self.queue_steps = queue_steps
        self.min_tokens = min_tokens
        self._groups: dict[float, list[tuple[float, tuple[float, ...], RankKey, RankLoad]]] = {}
        self._entry: dict[RankKey, tuple[float, tuple[float, ...], RankKey, RankLoad]] = {}
        self._cap: dict[RankKey, float] = {}
        for r in serving:
            if r.kv_usage is not None and r.kv_usage >= KV_HIGH_WATERMARK:
                continue
            cap = capacity_tokens(r, queue_steps, min_tokens)
            entry = self._make(r)
            self._cap[r.key] = cap
            self._entry[r.key] = entry
            self._groups.setdefault(cap, []).append(entry)
        for entries in self._groups.values():
            entries.sort(key=_entry_order)

    def _make(self, r: RankLoad) -> tuple[float, tuple[float, ...], RankKey, RankLoad]:
        if self.decode is None:
            tail: tuple[float, ...] = decode_load_key(r)
        else:
            load = self.decode.loads[r.key]
            tail = (load.requests // self.decode.bucket, load.kv_tokens)
        return (self.level[r.key], tail, r.key, r)

    def headroom(self) -> float:
        """The most prompt tokens a rank below the KV watermark can still take (``inf`` if one has nothing queued,
        ``-inf`` if there is none): the lowest level of each group sets it."""
        best = -math.inf
        for cap, entries in self._groups.items():
            if entries:
                low = entries[0][0]
                if low <= 0:
                    return math.inf
                best = max(best, cap - low)
        return best

    def best_fitting(self, tokens: int) -> RankLoad | None:
        """The rank with the lowest key among those ``tokens`` more prompt tokens fit (:func:`fits`), or ``None``."""
        best: tuple[tuple[object, ...], RankLoad] | None = None
        for cap, entries in self._groups.items():
            if not entries:
                continue
            low = entries[0][0]
            if not (low + tokens <= cap or low <= 0):
                continue  # the lowest level of the group does not fit: no higher one does
            found = self._lowest(entries)
            if best is None or found[0] < best[0]:
                best = found
        return None if best is None else best[1]

    def _lowest(
        self, entries: list[tuple[float, tuple[float, ...], RankKey, RankLoad]]
    ) -> tuple[tuple[object, ...], RankLoad]:
        """The full key and rank of the best of ``entries``' lowest level (the decode-aware outlier flag read)."""
        low = entries[0][0]
        decode = self.decode
        if decode is None:
            first = entries[0]
            return (first[0], first[1], first[2]), first[3]
        for entry in entries:
            if entry[0] != low:
                break
            if not decode.is_outlier(entry[2]):
                return (low, 0, *entry[1], entry[2]), entry[3]
        first = entries[0]
        return (low, 1, *first[1], first[2]), first[3]

    def best_of_all(self) -> RankLoad:
        """The rank with the lowest key among all serving ranks, fitting or not (a request past ``max_wait_s``)."""
        decode = self.decode
        level = self.level
        if decode is None:
            return min(self.serving, key=lambda r: (level[r.key], decode_load_key(r), r.key))
        return min(self.serving, key=lambda r: (level[r.key], decode.key(r.key), r.key))

    def moved(self, rank: RankLoad) -> None:
        """``rank``'s level (and decode load) changed: re-sort its entry."""
        old = self._entry.get(rank.key)
        if old is None:
            return
        entries = self._groups[self._cap[rank.key]]
        del entries[bisect.bisect_left(entries, _entry_order(old), key=_entry_order)]
        new = self._make(rank)
        self._entry[rank.key] = new
        bisect.insort(entries, new, key=_entry_order)


def _entry_order(entry: tuple[float, tuple[float, ...], RankKey, RankLoad]) -> tuple[float, tuple[float, ...], RankKey]:
    return entry[0], entry[1], entry[2]


def assigned_levels(allocation: Allocation, ranks: Sequence[RankLoad]) -> dict[RankKey, float]:
    """Per-rank prefill level after ``allocation`` (queued tokens plus the newly assigned prompt tokens)."""
    level = {r.key: r.queued_prefill_tokens for r in ranks}
    for request, key in allocation.assigned:
        level[key] += request.prompt_tokens
    return level


class WaterFill:
    """The ``water_fill`` allocator: :func:`water_fill` with its settings (``allocator`` section, kind
    ``water_fill``) and the decode-aware choice (``decode`` section, ``None`` when off)."""

    def __init__(self, settings: WaterFillConfig, decode: DecodeConfig | None) -> None:
        self.settings = settings
        self.decode = decode
        self.queue_steps = math.inf if settings.queue_steps is None else settings.queue_steps

    def place(self, batch: Sequence[PendingRequest], ranks: Sequence[RankLoad], now: float) -> Allocation:
        """Place a window's batch (see :func:`water_fill`)."""
        settings = self.settings
        return water_fill(
            batch,
            ranks,
            now=now,
            max_wait_s=settings.max_wait_s,
            queue_steps=self.queue_steps,
            min_queue_tokens=settings.min_queue_tokens,
            decode=decode_ranker(ranks, self.decode),
            shortest_first=settings.shortest_first,
        )
