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
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from gateway.scheduling import kernel
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
    compiled: bool = True,
) -> Allocation:
    """Place a window's batch on DP ranks by prefill water-filling.

    Each request goes to the fitting rank with the lowest ``(level, decode key, rank)``: compiled
    (:mod:`gateway.scheduling.kernel`, ``water_kernel``: one pass over the ranks serving its model, ~1 ns a rank)
    where numba is installed; otherwise the ranks serving a model are kept sorted by that key within groups of
    equal capacity (:class:`_Levels`), a request costing O(log n) comparisons plus an O(n) memmove per group.
    The decode ranker, like :func:`~gateway.scheduling.phase.phase_fill`'s, is not to be reused after the call.

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
        compiled: place with the compiled loop (:mod:`gateway.scheduling.kernel`: one pass over the ranks serving
            the model per request, the same keys) where numba is installed; ``False`` for the Python path.

    Returns:
        An :class:`Allocation`: assigned pairs (longest prompt first), deferred requests (arrival order), and
        requests that no usable rank serves.
    """
    kernels = kernel.load() if compiled else None
    if kernels is not None:
        return _water_fill_compiled(
            kernels, batch, ranks, now, max_wait_s, queue_steps, min_queue_tokens, decode, shortest_first
        )
    result = Allocation()
    state = _Ranks(ranks, queue_steps, min_queue_tokens, decode)
    by_model: dict[str, _Levels] = {}
    for request in placement_order(batch, shortest_first):
        levels = by_model.get(request.model)
        if levels is None:
            levels = by_model[request.model] = _Levels(state, request.model)
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
        for other in by_model.values():
            other.remove(best)
        state.place(best, tokens)
        for other in by_model.values():
            other.add(best)
        result.assigned.append((request, state.loads[best].key))
    result.deferred.sort(key=lambda q: q.arrival_s)
    return result


def _water_fill_compiled(
    kernels: ModuleType,
    batch: Sequence[PendingRequest],
    ranks: Sequence[RankLoad],
    now: float,
    max_wait_s: float,
    queue_steps: float,
    min_tokens: float,
    decode: DecodeRanker | None,
    shortest_first: bool,
) -> Allocation:
    """:func:`water_fill` with the compiled loop (:func:`gateway.scheduling.kernel.compiled.water_kernel`)."""
    loads = [r for r in ranks if r.usable]
    order, tokens, arrival = kernel.placement_arrays(batch, shortest_first)
    engines: dict[str, int] = {}
    instance = np.array([engines.setdefault(r.key.engine, len(engines)) for r in loads], dtype=np.int64)
    position = np.empty(len(loads), dtype=np.int64)
    position[sorted(range(len(loads)), key=lambda i: (loads[i].key.engine, loads[i].key.rank))] = np.arange(len(loads))
    model, mask = kernel.model_mask(order, loads)
    ranker, ties = kernel.ranker_or_none(decode, list(engines), loads)
    choice = kernels.water_kernel(
        np.array([r.queued_prefill_tokens for r in loads], dtype=float),
        np.array([capacity_tokens(r, queue_steps, min_tokens) for r in loads], dtype=float),
        np.array([r.kv_usage is None or r.kv_usage < KV_HIGH_WATERMARK for r in loads], dtype=np.bool_),
        position, mask, instance, kernel.COMPENSATED_SUM,
        decode is not None, ranker.requests, ranker.kv, ranker.bucket, ranker.iqr_k, ranker.g_pos, ranker.g_start,
        ranker.g_requests, ranker.g_kv, ranker.g_requests_sorted, ranker.g_kv_sorted, ranker.g_exact,
        ranker.g_sums, ranker.g_on, *ties,
        tokens, np.subtract(now, arrival) < max_wait_s, model,
    )  # fmt: skip
    result = Allocation()
    keys = [r.key for r in loads]
    for request, chosen in zip(order, choice.tolist(), strict=True):
        if chosen >= 0:
            result.assigned.append((request, keys[chosen]))
        else:
            (result.deferred if chosen == -1 else result.unplaceable).append(request)
    result.deferred.sort(key=lambda q: q.arrival_s)
    return result


class _Ranks:
    """The usable ranks of a snapshot by index, for :func:`water_fill`: levels, capacities, the decode-aware loads
    (a mirror of the ranker's, :meth:`DecodeLoad.plus <gateway.scheduling.decode.DecodeLoad.plus>`'s operations)
    and each rank's position in rank order (the last tie-break)."""

    def __init__(self, ranks: Sequence[RankLoad], queue_steps: float, min_tokens: float, decode: DecodeRanker | None):
        self.loads = [r for r in ranks if r.usable]
        self.decode = decode
        self.level = [r.queued_prefill_tokens for r in self.loads]
        self.capacity = [capacity_tokens(r, queue_steps, min_tokens) for r in self.loads]
        self.open = [r.kv_usage is None or r.kv_usage < KV_HIGH_WATERMARK for r in self.loads]
        position = sorted(range(len(self.loads)), key=lambda i: (self.loads[i].key.engine, self.loads[i].key.rank))
        self.order = [0] * len(self.loads)
        for place, i in enumerate(position):
            self.order[i] = place
        if decode is not None:
            self.engine = [r.key.engine for r in self.loads]
            self.requests = [decode.loads[r.key].requests for r in self.loads]
            self.kv = [decode.loads[r.key].kv_tokens for r in self.loads]

    def entry(self, i: int) -> tuple[float, ...]:
        """Rank ``i``'s sort entry: ``(level, tie-break..., position, i)``; the tie-break is the decode-aware key
        without its outlier flag (read while walking the lowest level: it moves with the fences), or
        :func:`decode_load_key` without the decode-aware choice."""
        if self.decode is None:
            return (self.level[i], *decode_load_key(self.loads[i]), self.order[i], i)
        return (self.level[i], self.requests[i] // self.decode.bucket, self.kv[i], self.order[i], i)

    def is_outlier(self, i: int) -> bool:
        """Whether rank ``i`` is an outlier of its instance now (:meth:`DecodeRanker.fences`)."""
        assert self.decode is not None
        requests_fence, kv_fence = self.decode.fences(self.engine[i])
        return self.requests[i] > requests_fence or self.kv[i] > kv_fence

    def place(self, i: int, tokens: int) -> None:
        """A request of ``tokens`` prompt tokens goes to rank ``i``."""
        self.level[i] += tokens
        if self.decode is not None:
            self.decode.place(self.loads[i].key, tokens)
            self.requests[i] = self.requests[i] + 1
            self.kv[i] = self.kv[i] + tokens


class _Levels:
    """The ranks serving one model, for :func:`water_fill`: those that may take a request (below the KV
    watermark) in groups of equal capacity, each sorted by :meth:`_Ranks.entry`."""

    def __init__(self, ranks: _Ranks, model: str) -> None:
        self.ranks = ranks
        self.serving = [i for i, r in enumerate(ranks.loads) if model in r.models]
        self._groups: dict[float, list[tuple[float, ...]]] = {}
        self._entry: dict[int, tuple[float, ...]] = {}
        for i in self.serving:
            if ranks.open[i]:
                self._entry[i] = entry = ranks.entry(i)
                self._groups.setdefault(ranks.capacity[i], []).append(entry)
        for entries in self._groups.values():
            entries.sort()

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

    def best_fitting(self, tokens: int) -> int | None:
        """The rank with the lowest key among those ``tokens`` more prompt tokens fit (:func:`fits`), or ``None``."""
        best: tuple[float, ...] | None = None
        for cap, entries in self._groups.items():
            if not entries:
                continue
            low = entries[0][0]
            if not (low + tokens <= cap or low <= 0):
                continue  # the lowest level of the group does not fit: no higher one does
            found = self._lowest(entries)
            if best is None or found < best:
                best = found
        return None if best is None else int(best[-1])

    def _lowest(self, entries: list[tuple[float, ...]]) -> tuple[float, ...]:
        """The full key of the best of ``entries``' lowest level, the outlier flag second."""
        first = entries[0]
        if self.ranks.decode is None:
            return first
        low = first[0]
        for entry in entries:
            if entry[0] != low:
                break
            if not self.ranks.is_outlier(int(entry[-1])):
                return (low, 0, *entry[1:])
        return (low, 1, *first[1:])

    def best_of_all(self) -> int:
        """The rank with the lowest key among all serving ranks, fitting or not (a request past ``max_wait_s``)."""
        ranks = self.ranks
        if ranks.decode is None:
            return min(self.serving, key=ranks.entry)
        return min(self.serving, key=lambda i: (ranks.level[i], ranks.is_outlier(i), *ranks.entry(i)[1:]))

    def remove(self, i: int) -> None:
        """Take rank ``i``'s entry out before its figures change."""
        old = self._entry.get(i)
        if old is not None:
            entries = self._groups[self.ranks.capacity[i]]
            del entries[bisect.bisect_left(entries, old)]

    def add(self, i: int) -> None:
        """Put rank ``i``'s entry back with its new figures."""
        if i in self._entry:
            self._entry[i] = entry = self.ranks.entry(i)
            bisect.insort(self._groups[self.ranks.capacity[i]], entry)


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
        kernel.load()  # compiled (or loaded from numba's cache) now, not inside the first window

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
