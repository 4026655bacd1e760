"""Compiled placement loops for the window allocators, and their loader.

:mod:`.compiled` holds the per-request loops of :func:`~gateway.scheduling.phase.phase_fill` and
:func:`~gateway.scheduling.allocation.water_fill` as numba kernels over flat arrays; the allocators call them
through :func:`load` and fall back to their numpy and Python paths (the same placements) when numba cannot be
imported. Why numba, and what its compile costs: ``bench/results/allocation_scale.md``.

numba compiles at the first call (a few seconds for both kernels) and keeps the machine code on disk
(``cache=True``: ``__pycache__`` next to the module where writable, else numba's user-wide cache directory or
``NUMBA_CACHE_DIR``), so a later process loads it in well under a second. :func:`load` runs both kernels once on a
tiny window so that the compile or the cache load happens when the allocators are built (scheduler
construction), never inside a window's placement.
"""

from __future__ import annotations

import functools
import itertools
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

import numpy as np

from gateway.scheduling.decode import MIN_RANKS_FOR_QUARTILES, DecodeRanker, RankerArrays, ranker_arrays
from gateway.scheduling.prefix_index import PrefixIndex
from gateway.types import PendingRequest, RankLoad

COMPENSATED_SUM = sys.version_info >= (3, 12)
"""CPython's :func:`sum` of floats uses Neumaier's compensated summation from 3.12 on (``Python/bltinmodule.c``);
the kernels reproduce the running interpreter's sums."""


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernels (:mod:`.compiled`), compiled or loaded from the cache and run once; ``None`` when numba
    is not installed or cannot be imported (the allocators then take their numpy path)."""
    try:
        from gateway.scheduling.kernel import compiled
    except ImportError:
        return None
    _warm(compiled)
    return compiled


def _warm(compiled: ModuleType) -> None:
    """Run both kernels on a window of one request over one rank, with the argument types of every real call."""
    f = np.zeros(1)
    ones = np.ones(1)
    i1 = np.zeros(1, dtype=np.int64)
    starts = np.array([0, 1], dtype=np.int64)
    yes = np.ones(1, dtype=np.bool_)
    mask = np.ones((1, 1), dtype=np.bool_)
    triple = np.zeros((1, 3))
    tokens = np.ones(1, dtype=np.int64)
    blocks = np.zeros(1, dtype=np.int64)
    compiled.phase_kernel(
        i1, starts, f.copy(), f.copy(), ones, ones, yes, f.copy(), f, mask,
        f, f, f, f, f, i1.copy(), 0.0, 0.0, True, False, 0.0, COMPENSATED_SUM,
        True, f.copy(), f.copy(), 1.0, 1.5, i1.copy(), starts, f.copy(), f.copy(), f.copy(), f.copy(), yes.copy(),
        triple.copy(), yes, f, f, f,
        tokens, yes, i1, i1.copy(), True, starts, blocks, 1, starts, i1, 512,
    )  # fmt: skip
    compiled.water_kernel(
        f.copy(),
        ones,
        yes,
        i1,
        mask,
        i1,
        COMPENSATED_SUM,
        True,
        f.copy(),
        f.copy(),
        1.0,
        1.5,
        i1.copy(),
        starts,
        f.copy(),
        f.copy(),
        f.copy(),
        f.copy(),
        yes.copy(),
        triple.copy(),
        yes,
        f,
        f,
        f,
        tokens,
        yes,
        i1,
    )


class RankTable:
    """One read of a snapshot's ranks, for the compiled paths: per rank (snapshot order) its figures as columns of
    :attr:`figures` (queued prefill tokens, prefill budget, KV usage with ``-1`` for unknown, running, waiting, KV
    tokens, usable as 0 or 1), and, when each engine's ranks are contiguous in the snapshot (the load view lists
    them so), the engines in order and where each one's ranks start (:attr:`starts`, one past the end last);
    ``starts`` is ``None`` otherwise (the callers then group ranks by engine in Python)."""

    QUEUED, BUDGET, KV_USAGE, RUNNING, WAITING, KV_TOKENS, USABLE = range(7)

    def __init__(self, ranks: Sequence[RankLoad]) -> None:
        self.ranks = ranks
        names = [r.key.engine for r in ranks]
        self.names = names
        """Each rank's engine."""
        rows = [
            (
                r.queued_prefill_tokens,
                r.prefill_budget,
                -1.0 if r.kv_usage is None else r.kv_usage,
                r.running,
                r.waiting,
                r.kv_tokens,
                r.usable,
            )
            for r in ranks
        ]
        self.figures = np.fromiter(itertools.chain.from_iterable(rows), dtype=float, count=7 * len(rows)).reshape(-1, 7)
        cuts = [i for i in range(1, len(names)) if names[i] != names[i - 1]]
        self.engines = [names[i] for i in [0, *cuts]] if names else []
        self.starts: np.ndarray | None = None
        if names and len(set(self.engines)) == len(self.engines):
            self.starts = np.array([0, *cuts, len(names)], dtype=np.int64)


def model_mask(requests: Sequence[PendingRequest], ranks: Sequence[RankLoad]) -> tuple[np.ndarray, np.ndarray]:
    """Each request's model as an index, and which of ``ranks`` serve each model (``models x ranks``)."""
    names = [q.model for q in requests]
    distinct = set(names)
    if len(distinct) <= 1:  # the common case: one model
        ids = dict.fromkeys(distinct, 0)
        model = np.zeros(len(names), dtype=np.int64)
    else:
        ids = {}
        model = np.array([ids.setdefault(name, len(ids)) for name in names], dtype=np.int64)
    mask = np.zeros((len(ids), len(ranks)), dtype=np.bool_)
    for name, m in ids.items():
        mask[m] = [name in r.models for r in ranks]
    return model, mask


def ranker_or_none(
    decode: DecodeRanker | None,
    engines: Sequence[str],
    ranks: Sequence[RankLoad],
    table: RankTable | None = None,
) -> tuple[RankerArrays, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The decode-aware choice's arrays (:func:`~gateway.scheduling.decode.ranker_arrays`) and, without it, the
    ranks' tie-break figures (:func:`~gateway.scheduling.allocation.decode_load_key`: running requests, KV usage,
    KV tokens); the part not used is empty. ``table``: the snapshot read once (:class:`RankTable`), when
    ``engines`` is its engine list and ``ranks`` its usable ranks in order."""
    empty = np.zeros(0)
    if decode is not None:
        fast = _table_ranker_arrays(decode, table) if table is not None and engines is table.engines else None
        return ranker_arrays(decode, engines, ranks) if fast is None else fast, (empty, empty, empty)
    ties = (
        np.array([r.running for r in ranks], dtype=float),
        np.array([0.0 if r.kv_usage is None else r.kv_usage for r in ranks], dtype=float),
        np.array([r.kv_tokens for r in ranks], dtype=float),
    )
    n = len(ranks)
    off = RankerArrays(
        requests=np.zeros(n),
        kv=np.zeros(n),
        g_pos=np.full(n, -1, dtype=np.int64),
        g_start=np.zeros(len(engines) + 1, dtype=np.int64),
        g_requests=empty,
        g_kv=empty,
        g_requests_sorted=empty,
        g_kv_sorted=empty,
        g_exact=np.ones(len(engines), dtype=np.bool_),
        g_sums=np.zeros((len(engines), 3)),
        g_on=np.zeros(len(engines), dtype=np.bool_),
        bucket=1.0,
        iqr_k=0.0,
    )
    return off, ties


def _table_ranker_arrays(ranker: DecodeRanker, table: RankTable) -> RankerArrays | None:
    """:func:`~gateway.scheduling.decode.ranker_arrays` read off ``table`` with numpy, where that gives the same
    arrays: nothing placed through the ranker yet, built on the table's snapshot, each engine's ranks contiguous,
    and every group's figures whole numbers adding up to less than 2**53 (so any order of the sums is exact);
    ``None`` otherwise."""
    starts = table.starts
    if ranker.built or ranker.ranks is not table.ranks or starts is None:
        return None
    figures = table.figures
    requests = figures[:, RankTable.RUNNING] + figures[:, RankTable.WAITING]
    kv = figures[:, RankTable.KV_TOKENS]
    both = np.concatenate((requests, kv))
    if not bool(np.all(np.isfinite(both) & (both == np.floor(both)))):
        return None
    firsts = starts[:-1]
    magnitude = np.add.reduceat(np.abs(requests), firsts) + np.add.reduceat(np.abs(kv), firsts)
    if not bool(np.all(magnitude < 2**53)):
        return None
    sizes = np.diff(starts)
    group = np.repeat(np.arange(len(sizes)), sizes)
    usable = np.flatnonzero(figures[:, RankTable.USABLE] != 0)
    on = sizes >= MIN_RANKS_FOR_QUARTILES if ranker.iqr_k is not None else np.zeros(len(sizes), dtype=np.bool_)
    return RankerArrays(
        requests=requests[usable],
        kv=kv[usable],
        g_pos=usable.astype(np.int64),
        g_start=starts.astype(np.int64),
        g_requests=requests,
        g_kv=kv.copy(),
        g_requests_sorted=requests[np.lexsort((requests, group))],
        g_kv_sorted=kv[np.lexsort((kv, group))],
        g_exact=np.ones(len(sizes), dtype=np.bool_),
        # sum() starts from 0, and 0 + -0.0 is 0.0
        g_sums=np.stack((np.add.reduceat(requests, firsts) + 0.0, np.add.reduceat(kv, firsts) + 0.0, magnitude), 1),
        g_on=on,
        bucket=float(ranker.bucket),
        iqr_k=0.0 if ranker.iqr_k is None else float(ranker.iqr_k),
    )


def prefix_arrays(
    requests: Sequence[PendingRequest], prefix: PrefixIndex, positions: Callable[[], dict[tuple[str, int], int]]
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray]:
    """The requests' prefix blocks as dense ids (``b_off`` delimits each request's), how many distinct blocks,
    and for each distinct block the ranks (array indices by ``(engine, rank)``, from ``positions``, asked only when
    some block is held) the prefix index says hold it (``h_off`` delimits each block's)."""
    sequences = [q.prefix_blocks for q in requests]
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(requests))
    b_off = np.zeros(len(requests) + 1, dtype=np.int64)
    np.cumsum(lengths, out=b_off[1:])
    blocks = itertools.chain.from_iterable(sequences)
    distinct: list[int]
    try:  # block hashes are unsigned 64-bit integers: numpy finds the distinct ones
        values, inverse = np.unique(np.fromiter(blocks, dtype=np.uint64, count=int(b_off[-1])), return_inverse=True)
        distinct = values.tolist()
        b_ids = inverse.astype(np.int64).reshape(-1)
    except (OverflowError, ValueError, TypeError):  # other integers: a dict does
        ids: dict[int, int] = {}
        b_ids = np.array(
            [ids.setdefault(b, len(ids)) for b in itertools.chain.from_iterable(sequences)],
            dtype=np.int64,
        )
        distinct = list(ids)
    held = prefix.holders(distinct)
    counts = np.zeros(len(distinct), dtype=np.int64)
    holders: list[int] = []
    index: dict[tuple[str, int], int] | None = None
    for block in itertools.compress(range(len(held)), held):
        if index is None:
            index = positions()
        before = len(holders)
        for key in held[block]:
            i = index.get((key.engine, key.rank))
            if i is not None:
                holders.append(i)
        counts[block] = len(holders) - before
    h_off = np.zeros(len(distinct) + 1, dtype=np.int64)
    np.cumsum(counts, out=h_off[1:])
    return b_off, b_ids, len(distinct), h_off, np.array(holders, dtype=np.int64)


def placement_arrays(
    batch: Sequence[PendingRequest], shortest_first: bool
) -> tuple[list[PendingRequest], np.ndarray, np.ndarray]:
    """The batch in :func:`~gateway.scheduling.allocation.placement_order` (by a stable numpy sort on the same
    keys), with its prompt tokens and arrival times in that order."""
    n = len(batch)
    tokens = np.fromiter([q.prompt_tokens for q in batch], dtype=np.int64, count=n)
    arrival = np.fromiter([q.arrival_s for q in batch], dtype=float, count=n)
    if shortest_first:
        order = np.lexsort((arrival, tokens))
    else:
        deferrals = np.fromiter([q.deferrals for q in batch], dtype=np.int64, count=n)
        order = np.lexsort((arrival, -tokens, -deferrals))
    return [batch[i] for i in order.tolist()], tokens[order], arrival[order]
