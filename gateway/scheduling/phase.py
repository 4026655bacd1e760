"""Phase-aware placement: send each request to the instance and rank where it will get its first token soonest.

Water-filling (:mod:`gateway.scheduling.allocation`) balances prefill tokens across DP ranks but does not know
where each instance is in its step. An instance in the middle of a long prefill step makes a new request wait
for the rest of it; an idle instance starts at once. With the step boundaries the gateway infers from token
arrivals and its fitted step-time model ``d_e(H, S)`` (:class:`~gateway.scheduling.step_clock.StepClock`: ``H`` the
heaviest rank's prefill tokens in a step, ``S`` the ranks' mean), the placement cost of a request of ``t`` prompt
tokens on rank ``r`` of instance ``e``, whose next step carries ``H_e`` and ``S_e`` and whose rank ``r`` has ``q``
tokens queued after the step in progress, is

    wait(e) + d_e(H', S') + max(0, q + t - B) / B * d_e(B, S') + (d_e(H', S') - d_e(H_e, S_e)) * (n_e + w * running_e)

with ``H' = max(H_e, min(q + t, B))`` and ``S'`` the mean with ``r``'s next-step tokens raised to ``min(q + t, B)``
(``B`` the rank's per-step budget): the wait for the instance's next step (0 when idle), that step, the further
steps the rank needs for the rest of its queue and the request's chunks, and what a longer next step costs the
``n_e`` requests already bound for it and the decoding requests it stalls, weighted by ``w``. With the prefix index
(:mod:`gateway.scheduling.prefix_index`) ``t`` is only what ``r``'s prefix cache probably lacks. Requests are
placed longest first, each at its cheapest (instance, rank); ties go to the rank with less to prefill, then the
decode-aware choice (:mod:`gateway.scheduling.decode`: outliers last, then fewest requests in buckets, then least
KV), then the rank with fewer tokens bound for the next step, then the instance with fewer queued. This is our
reading of SBS's "waiting to accelerate" and staggering (``docs/design.md`` §2.8), applied to the whole cluster at
once.

Why it is the default allocator: ``bench/results/decisions.md#allocator``.

**Long-prefill isolation** (``long_prefill_tokens``). The cost above counts prefill tokens, not their context, but
attention makes a chunk's cost grow with the context before it: in the engine model
(:mod:`gateway.sim.calibration`) an 8k-token chunk takes about 1.2 s at the start of a prompt and 10 s at 100k
tokens in. In lockstep the rank carrying that chunk sets the step time of the whole instance, so every short
prompt and every decode on the instance waits it out, for the many steps a long prompt's chunked prefill lasts.
So a prompt longer than ``long_prefill_tokens`` goes, among the ranks it fits, to an instance that already has a
rank with that much queued (where it barely lengthens steps that are long anyway), and a shorter prompt goes, if
it fits anywhere else, to an instance without one; within that choice the cost decides as above. The threshold is
in tokens, not chunked-prefill budgets, as the cost comes from the context (measured:
``bench/results/decisions.md#long-prefill-isolation``). The level of a rank comes from the gateway's own
accounting (:mod:`gateway.load.view`): a non-streamed prompt, whose first token the gateway does not see, counts
for an estimate of its prefill time.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from gateway.scheduling import kernel
from gateway.scheduling.allocation import KV_HIGH_WATERMARK, placement_order
from gateway.scheduling.decode import DecodeRanker, decode_ranker
from gateway.scheduling.prefix_index import PrefixIndex
from gateway.scheduling.step_clock import StepClock
from gateway.scheduling.types import Allocation
from gateway.types import PendingRequest, RankKey, RankLoad

if TYPE_CHECKING:
    from gateway.config import DecodeConfig, PhaseAwareConfig

DECODE_STALL_WEIGHT = 0.005
"""Default ``w``: how much one decoding request's stall counts against one waiting request's TTFT.

It trades TTFT for TPOT: higher favours the decoding requests. Chosen on five Azure conversation slices at 80%
and 95% load: ``bench/results/decisions.md#decode-stall-weight``."""


def _matched(
    prefix: PrefixIndex, staged: dict[int, list[tuple[RankKey, tuple[int, ...]]]], blocks: tuple[int, ...]
) -> dict[RankKey, int]:
    """Leading blocks of ``blocks`` each rank holds: in the index, or placed there earlier in this batch."""
    matched = prefix.match(blocks)
    for key, other in staged.get(blocks[0], ()) if blocks else ():
        common = 0
        for a, b in zip(blocks, other, strict=False):
            if a != b:
                break
            common += 1
        if common > matched.get(key, 0):
            matched[key] = common
    return matched


def phase_fill(
    batch: Sequence[PendingRequest],
    ranks: Sequence[RankLoad],
    clock: StepClock,
    current_step_tokens: dict[RankKey, float],
    *,
    now: float,
    max_wait_s: float,
    queue_steps: float,
    min_queue_tokens: float = 0.0,
    decode_stall_weight: float = DECODE_STALL_WEIGHT,
    decode: DecodeRanker | None = None,
    use_step_phase: bool = True,
    shortest_first: bool = False,
    long_prefill_tokens: float | None = None,
    prefix: PrefixIndex | None = None,
    compiled: bool = True,
) -> Allocation:
    """Place a batch by predicted time to first token (see the module docstring).

    The whole loop runs compiled (:mod:`gateway.scheduling.kernel`, ``phase_kernel``: instances ruled out by a
    lower bound, a few ranks of an instance in its tie-break order where one sits at that bound, else one pass
    over its ranks); without numba, or with ``compiled=False``, each request's cost is computed for every fitting
    rank at once with numpy over the arrays of :class:`_Cluster`. Both use the floating-point operations of the
    step-time model in the order a rank-by-rank evaluation of the formula performs them and the same keys, so
    the costs and the choice are those of a scan (``tests/unit/test_allocation_reference.py``); what a placement
    changes (the rank's levels, its instance's next-step figures, the decode-aware loads and fences of its
    instance) is updated in place.

    Args:
        batch: the window's requests.
        ranks: a snapshot of every DP rank's load.
        clock: step boundaries and durations per engine.
        current_step_tokens: prompt tokens of each rank taken by the step in progress (the rest of its queued
            tokens wait for the next step).
        now: current time (seconds).
        max_wait_s: a request older than this is placed even where it does not fit (seconds).
        queue_steps: a rank's capacity in per-step prefill budgets.
        min_queue_tokens: a rank's capacity is at least this many prompt tokens
            (:func:`~gateway.scheduling.allocation.capacity_tokens`).
        decode_stall_weight: ``w`` above.
        decode: decode-aware choice (:mod:`gateway.scheduling.decode`): ranks of equal cost are ordered by it
            (each instance's outlier ranks last, then the lexicographic key) before their next-step prefill
            level; ``None`` orders them by next-step level, then running requests and KV usage. The predicted
            first-token time stays first (``bench/results/decisions.md#iqr-outliers``). The ranker describes the
            loads before the batch; the numpy path records the placements in it, the compiled one does not, so
            it is not to be reused after the call.
        use_step_phase: use each instance's step phase (``wait(e)``); ``False`` treats every instance as ready now
            (the staggering switched off, for ablation).
        shortest_first: place the shortest prompts first instead of the longest
            (:func:`~gateway.scheduling.allocation.placement_order`).
        long_prefill_tokens: long-prefill isolation (module docstring): a prompt longer than this (tokens) is long,
            an instance with a rank holding more than that many queued prompt tokens is slow, and long prompts go to
            slow instances, others to the rest, where they fit; ``None`` switches it off.
        prefix: the prefix index: on each rank a request counts only the prompt tokens the rank's prefix cache
            probably lacks, counting the blocks of the requests placed before it in this batch as if they were
            already in the index (the scheduler enters them in that order when it dispatches them), so that
            requests sharing a prefix go together where the cost allows; ``None``: every prompt counts whole.
        compiled: place with the compiled loop where numba is installed; ``False`` for the numpy path.
    """
    result = Allocation()
    kernels = kernel.load() if compiled else None
    cluster = _Cluster(
        ranks,
        clock,
        current_step_tokens,
        now=now,
        queue_steps=queue_steps,
        min_queue_tokens=min_queue_tokens,
        decode_stall_weight=decode_stall_weight,
        decode=decode,
        use_step_phase=use_step_phase,
        long_prefill_tokens=long_prefill_tokens,
        numpy_path=kernels is None,
    )
    if kernels is not None:
        _place_compiled(
            kernels, cluster, batch, shortest_first, result, now, max_wait_s, decode, long_prefill_tokens, prefix
        )
    else:
        _place_numpy(cluster, placement_order(batch, shortest_first), result, now, max_wait_s, prefix)
    result.deferred.sort(key=lambda q: q.arrival_s)
    return result


def _place_numpy(
    cluster: _Cluster,
    order: list[PendingRequest],
    result: Allocation,
    now: float,
    max_wait_s: float,
    prefix: PrefixIndex | None,
) -> None:
    """Place ``order`` one request at a time with :class:`_Cluster`'s numpy operations."""
    staged: dict[int, list[tuple[RankKey, tuple[int, ...]]]] = {}  # first block -> this batch's placements
    for request in order:
        t = request.prompt_tokens
        cached: dict[RankKey, int] = {}
        if prefix is not None:
            cached = {
                key: prefix.cached_tokens(blocks, t)
                for key, blocks in _matched(prefix, staged, request.prefix_blocks).items()
            }
        forced = now - request.arrival_s >= max_wait_s
        found = cluster.best(request.model, t, cached, forced)
        if found is None:
            (result.deferred if cluster.serves(request.model) else result.unplaceable).append(request)
            continue
        index, uncached = found
        key = cluster.place(index, uncached, t)
        if prefix is not None and request.prefix_blocks:
            staged.setdefault(request.prefix_blocks[0], []).append((key, request.prefix_blocks))
        result.assigned.append((request, key))


def _place_compiled(
    kernels: ModuleType,
    cluster: _Cluster,
    batch: Sequence[PendingRequest],
    shortest_first: bool,
    result: Allocation,
    now: float,
    max_wait_s: float,
    decode: DecodeRanker | None,
    long_prefill_tokens: float | None,
    prefix: PrefixIndex | None,
) -> None:
    """Place ``batch`` with the compiled loop (:func:`gateway.scheduling.kernel.compiled.phase_kernel`) over
    ``cluster``'s arrays."""
    loads = cluster.loads
    order, tokens, arrival = kernel.placement_arrays(batch, shortest_first)
    model, mask = kernel.model_mask(order, loads)
    ranker, ties = kernel.ranker_or_none(decode, cluster.engines, loads, cluster.table)
    forced = np.subtract(now, arrival) >= max_wait_s
    if prefix is not None:
        b_off, b_ids, distinct, h_off, h_rank = kernel.prefix_arrays(order, prefix, cluster.positions)
        block_tokens = prefix.block_tokens
    else:
        b_off = np.zeros(len(order) + 1, dtype=np.int64)
        b_ids = h_rank = np.zeros(0, dtype=np.int64)
        h_off = np.zeros(1, dtype=np.int64)
        distinct, block_tokens = 0, 1
    starts = np.array([sl.start for sl in cluster.slices] + [len(loads)], dtype=np.int64)
    # each instance's ranks in the order of the tie-break's keys (phase_kernel's walk)
    positions = np.arange(len(loads))
    sort_keys: list[np.ndarray] = (
        [positions, cluster.next_level, ranker.kv, ranker.requests // ranker.bucket, cluster.instance]
        if decode is not None
        else [positions, ties[2], ties[1], ties[0], cluster.next_level, cluster.instance]
    )
    sorted_idx = np.lexsort(sort_keys).astype(np.int64)
    theta = cluster.theta
    choice = kernels.phase_kernel(
        cluster.instance, starts, cluster.level, cluster.next_level, cluster.budget, cluster.capacity,
        cluster.open, cluster.first, cluster.a_budget, mask,
        theta[:, 0].copy(), theta[:, 1].copy(), theta[:, 2].copy(), cluster.instance_wait,
        np.array(cluster.running, dtype=float), np.array(cluster.waiting_next, dtype=np.int64), float(cluster.weight),
        float(cluster.magnitude), bool(cluster.whole), long_prefill_tokens is not None,
        0.0 if long_prefill_tokens is None else float(long_prefill_tokens), kernel.COMPENSATED_SUM,
        decode is not None, ranker.requests, ranker.kv, ranker.bucket, ranker.iqr_k, ranker.g_pos, ranker.g_start,
        ranker.g_requests, ranker.g_kv, ranker.g_requests_sorted, ranker.g_kv_sorted, ranker.g_exact,
        ranker.g_sums, ranker.g_on, *ties,
        tokens, forced, model, sorted_idx,
        prefix is not None, b_off, b_ids, distinct, h_off, h_rank, int(block_tokens),
    )  # fmt: skip
    placed = choice >= 0
    keys = [r.key for r in loads]
    result.assigned.extend(
        zip(itertools.compress(order, placed.tolist()), map(keys.__getitem__, choice[placed].tolist()), strict=True)
    )
    if not placed.all():
        serves = [bool(row.any()) for row in mask]
        for i in np.flatnonzero(~placed).tolist():
            (result.deferred if serves[model[i]] else result.unplaceable).append(order[i])


class _Model:
    """Per-rank copies of each instance's figures over one model's candidate ranks (the usable ranks serving it),
    for :class:`_Cluster`: ``H_e``, ``S_e``, the candidate count, ``d_e(H_e, S_e)``, the instance's total level
    and whether it is slow (long-prefill isolation)."""

    def __init__(self, mask: np.ndarray, instances: int, size: int) -> None:
        self.mask = mask
        self.open = mask
        self.serves = bool(mask.any())
        self.heaviest = np.zeros(size)
        self.mean = np.zeros(size)
        self.count = np.ones(size)
        self.d_old = np.zeros(size)
        self.total_level = np.zeros(size)
        self.slow = np.zeros(size, dtype=bool)
        self.first_sum = [0.0] * instances
        self.level_sum = [0.0] * instances
        self.members: list[np.ndarray] = [np.empty(0, dtype=np.intp)] * instances


class _Cluster:
    """The usable ranks of a snapshot as arrays, instance by instance in snapshot order (so an array index orders
    ranks as the scan over instances and their ranks did), with what a placement changes kept up to date."""

    def __init__(
        self,
        ranks: Sequence[RankLoad],
        clock: StepClock,
        current_step_tokens: dict[RankKey, float],
        *,
        now: float,
        queue_steps: float,
        min_queue_tokens: float,
        decode_stall_weight: float,
        decode: DecodeRanker | None,
        use_step_phase: bool,
        long_prefill_tokens: float | None,
        numpy_path: bool = True,
    ) -> None:
        self.clock = clock
        self.decode = decode
        self.long = long_prefill_tokens
        table = kernel.RankTable(ranks) if not numpy_path else None
        if table is not None and table.starts is not None:
            # each engine's ranks contiguous (the load view's order): the grouping below, read off the table
            starts = table.starts
            everything = table.figures
            usable = everything[:, kernel.RankTable.USABLE] != 0
            self.engines = table.engines
            self.loads = list(itertools.compress(ranks, usable.tolist()))
            sizes = np.add.reduceat(usable.astype(np.int64), starts[:-1]).tolist()
            active = (everything[:, kernel.RankTable.RUNNING] > 0) | (everything[:, kernel.RankTable.WAITING] > 0)
            busy = dict(zip(self.engines, np.logical_or.reduceat(active, starts[:-1]).tolist(), strict=True))
            column = everything[:, kernel.RankTable.RUNNING]
            # Python adds 0.0 and each rank's figure left to right; a cumulative sum does the same additions
            running = {
                engine: 0.0 + float(np.cumsum(column[starts[i] : starts[i + 1]])[-1])
                for i, engine in enumerate(self.engines)
            }
            figures = everything[usable]
            self.table: kernel.RankTable | None = table
        else:
            engines: dict[str, list[RankLoad]] = {}
            busy = {}
            running = {}
            for r in ranks:
                group = engines.setdefault(r.key.engine, [])
                busy[r.key.engine] = busy.get(r.key.engine, False) or r.running > 0 or r.waiting > 0
                running[r.key.engine] = running.get(r.key.engine, 0.0) + r.running
                if r.usable:
                    group.append(r)
            self.engines = list(engines)
            self.loads = [r for group in engines.values() for r in group]
            sizes = [len(group) for group in engines.values()]
            # one pass over the ranks' figures; capacity_tokens, max(0, ...) and the KV watermark test written out
            # with Python's max (the first argument unless the second is greater)
            figures = np.array(
                [
                    (r.queued_prefill_tokens, r.prefill_budget, -1.0 if r.kv_usage is None else r.kv_usage)
                    for r in self.loads
                ],
                dtype=float,
            ).reshape(-1, 3)
            self.table = None
        loads = self.loads
        n = len(loads)
        self.instance = np.repeat(np.arange(len(sizes), dtype=np.intp), sizes)
        bounds = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=bounds[1:])
        self.starts = bounds
        """Where each instance's ranks start in the arrays, one past the end last."""
        self.slices = [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds.tolist())]
        self.level = figures[:, 0].copy()
        self._positions: dict[tuple[str, int], int] | None = None
        taken = np.zeros(n)
        if current_step_tokens:
            # each key's array index (-1 for a rank not in the arrays), looked up in C
            keys = list(current_step_tokens)
            found = np.fromiter(
                map(self.positions().get, zip(map(_ENGINE, keys), map(_RANK, keys), strict=True), itertools.repeat(-1)),
                dtype=np.int64,
                count=len(keys),
            )
            tokens = np.fromiter(current_step_tokens.values(), dtype=float, count=len(keys))
            inside = found >= 0
            taken[found[inside]] = tokens[inside]
        remaining = self.level - taken
        self.next_level = np.where(remaining > 0.0, remaining, 0.0)
        self.budget = figures[:, 1].copy()
        steps = self.budget * queue_steps
        self.capacity = np.where(min_queue_tokens > steps, min_queue_tokens, steps)
        self.open = figures[:, 2] < KV_HIGH_WATERMARK
        self.empty = self.level <= 0
        self.magnitude = float(np.abs(self.level).sum() + np.abs(self.next_level).sum())
        self.whole = _whole(self.level) and _whole(self.next_level) and self.magnitude < 2**53
        """Every token figure a whole number, their magnitudes adding up to less than 2**53 (so any sum of them is
        exact whatever the order): the instance sums can run instead of being recomputed."""
        self.first_before = 0.0
        self._scratch = [np.empty(n) for _ in range(5)]
        self._fit = np.empty(n, dtype=bool)
        theta = []
        wait = []
        for engine in self.engines:
            model = clock.model(engine)
            model.predict(0.0, 0.0)  # solves the coefficients if steps came in since
            theta.append(model.theta)
            wait.append(clock.time_to_next_step(engine, now) if busy[engine] and use_step_phase else 0.0)
        self.theta = np.array(theta, dtype=float).reshape(-1, 3)
        self.instance_wait = np.array(wait, dtype=float)
        coefficients = self.theta[self.instance].T.copy()
        self.a, self.b, self.c = coefficients[0], coefficients[1], coefficients[2]
        self.a_budget = self.a + self.b * self.budget / 1000.0
        self.wait = np.array(wait, dtype=float)[self.instance]
        self.first = np.minimum(self.next_level, self.budget)
        self.waiting_next = [int(np.count_nonzero(self.next_level[sl] > 0)) for sl in self.slices]
        self.running = [running[e] for e in self.engines]
        self.weight = decode_stall_weight
        self.stalled = np.array(
            [self.waiting_next[i] + decode_stall_weight * self.running[i] for i in range(len(sizes))], dtype=float
        )[self.instance]
        if numpy_path and decode is None:
            self.tie = [
                np.array([r.running for r in loads], dtype=float),
                np.array([0.0 if r.kv_usage is None else r.kv_usage for r in loads], dtype=float),
                np.array([r.kv_tokens for r in loads], dtype=float),
            ]
        elif numpy_path and decode is not None:
            decode_loads = [decode.loads[r.key] for r in loads]
            self.requests = np.array([d.requests for d in decode_loads], dtype=float)
            self.kv = np.array([d.kv_tokens for d in decode_loads], dtype=float)
            self.bucket = self.requests // decode.bucket
            self.outlier = np.zeros(n, dtype=bool)
            self.fences: list[tuple[float, float] | None] = [None] * len(self.engines)
            for i in range(len(self.engines)):
                self._outliers(i)
        self.models: dict[str, _Model] = {}
        self.index: dict[RankKey, int] | None = None
        """Rank → array index, built on the first prefix hit."""

    def positions(self) -> dict[tuple[str, int], int]:
        """Each usable rank's array index by ``(engine, rank)`` (a tuple hashes in C, a ``RankKey`` in Python)."""
        if self._positions is None:
            keys = [r.key for r in self.loads]
            self._positions = dict(
                zip(zip(map(_ENGINE, keys), map(_RANK, keys), strict=True), range(len(keys)), strict=True)
            )
        return self._positions

    def _outliers(self, instance: int, index: int | None = None) -> None:
        """Mark the outliers of ``instance``: all its ranks when its fences moved, else only rank ``index``."""
        assert self.decode is not None
        fences = self.decode.fences(self.engines[instance])
        requests_fence, kv_fence = fences
        if index is not None and fences == self.fences[instance]:
            self.outlier[index] = self.requests[index] > requests_fence or self.kv[index] > kv_fence
            return
        self.fences[instance] = fences
        sl = self.slices[instance]
        self.outlier[sl] = (self.requests[sl] > requests_fence) | (self.kv[sl] > kv_fence)

    def _model(self, model: str) -> _Model:
        view = self.models.get(model)
        if view is None:
            mask = np.array([model in r.models for r in self.loads], dtype=bool)
            view = self.models[model] = _Model(mask, len(self.engines), len(self.loads))
            view.open = mask & self.open
            for i, sl in enumerate(self.slices):
                view.members[i] = sl.start + np.flatnonzero(mask[sl])
                self._refresh(view, i)
        return view

    def _refresh(self, view: _Model, instance: int, index: int | None = None, added: float = 0.0) -> None:
        """Set one instance's figures over the model's candidates as the scan computed them (left-to-right sums);
        after a placement of ``added`` tokens on rank ``index`` the maximum and, with whole token counts
        (:attr:`whole`), the sums follow the change instead of being recomputed."""
        members = view.members[instance]
        if not len(members):
            return
        sl = self.slices[instance]
        if index is None or not self.whole:
            firsts = self.first[members]
            levels = self.level[members]
            heaviest = float(firsts.max())
            view.first_sum[instance] = sum(firsts.tolist())
            view.level_sum[instance] = sum(levels.tolist())
            slow = bool(levels.max() > self.long) if self.long is not None else False
        else:
            # Whole numbers below 2**52 add exactly in any order: the running sums are the scan's sums.
            heaviest = max(float(view.heaviest[sl.start]), float(self.first[index]))
            view.first_sum[instance] += float(self.first[index]) - self.first_before
            view.level_sum[instance] += added
            slow = self.long is not None and (bool(view.slow[sl.start]) or float(self.level[index]) > self.long)
        mean = view.first_sum[instance] / len(members)
        view.heaviest[sl] = heaviest
        view.mean[sl] = mean
        view.count[sl] = len(members)
        view.d_old[sl] = self.clock.predict(self.engines[instance], heaviest, mean)
        view.total_level[sl] = view.level_sum[instance]
        view.slow[sl] = slow

    def serves(self, model: str) -> bool:
        """Whether some usable rank serves ``model``."""
        return self._model(model).serves

    def best(self, model: str, tokens: int, cached: dict[RankKey, int], forced: bool) -> tuple[int, float] | None:
        """The index of the rank with the lowest key for a request of ``tokens`` prompt tokens, of which each rank
        in ``cached`` holds that many in its prefix cache, and the tokens it must prefill there; ``None`` when no
        candidate fits (or none serves ``model``)."""
        view = self._model(model)
        if not view.serves:
            return None
        work: float | np.ndarray = tokens
        if cached:
            work = np.full(len(self.loads), float(tokens))
            if self.index is None:
                self.index = {r.key: i for i, r in enumerate(self.loads)}
            index = self.index
            for key, hit in cached.items():
                i = index.get(key)
                if i is not None:
                    work[i] = tokens - hit
        if forced:
            fit = view.mask
        else:
            fit = np.less_equal(np.add(self.level, work, out=self._scratch[0]), self.capacity, out=self._fit)
            fit |= self.empty
            fit &= view.open
            if not fit.any():
                return None
        if self.long is not None:
            matching = fit & view.slow if tokens > self.long else fit & ~view.slow
            if matching.any():
                fit = matching
        cost = self._costs(view, work)
        masked = np.where(fit, cost, np.inf)
        ties = np.flatnonzero(masked == masked.min())
        chosen = int(ties[0])
        if len(ties) > 1:
            keys: list[np.ndarray] = []
            if cached:
                keys.append(np.asarray(work))
            if self.decode is None:
                keys += [self.next_level, view.total_level, *self.tie]
            else:
                keys += [self.outlier, self.bucket, self.kv, self.next_level, view.total_level]
            # np.lexsort sorts by its last key first and is stable: equal keys keep the lower index first.
            chosen = int(ties[np.lexsort([values[ties] for values in reversed(keys)])[0]])
        return chosen, float(tokens if not cached else work[chosen])  # type: ignore[index]

    def _costs(self, view: _Model, work: float | np.ndarray) -> np.ndarray:
        """Every rank's predicted cost of taking ``work`` more prompt tokens (the module docstring's formula),
        seconds: for rank ``r`` of instance ``e``, with ``q`` its next-step level, ``B`` its budget, ``n`` the
        instance's candidates, ``H``, ``S`` its next-step heaviest and mean figures and ``d(H, S)`` its step-time
        model (:meth:`StepTimeModel.predict <gateway.scheduling.step_clock.StepTimeModel.predict>`, written out
        with the same operations so the floats are the model's)::

            first_new = min(q + t, B);  S' = S + (first_new - min(q, B)) / n
            cost = wait(e) + d(max(H, first_new), S') + max(0, q + t - B) / B * d(B, S')
                   + (d(max(H, first_new), S') - d(H, S)) * (n_e + w * running_e)

        Computed in the scratch buffers; the result is valid until the next call."""
        budget = self.budget
        total, first_new, mean_new, c_mean, d_new = self._scratch
        np.add(self.next_level, work, out=total)
        np.minimum(total, budget, out=first_new)
        np.subtract(first_new, self.first, out=mean_new)
        mean_new /= view.count
        mean_new += view.mean
        np.multiply(self.c, mean_new, out=c_mean)
        c_mean /= 1000.0
        # d(max(H, first_new), S') = max(0, a + b * H' / 1000 + c * S' / 1000); a sum commutes exactly.
        np.maximum(view.heaviest, first_new, out=d_new)
        d_new *= self.b
        d_new /= 1000.0
        d_new += self.a
        d_new += c_mean
        np.maximum(d_new, 0.0, out=d_new)
        further = total
        further -= budget
        np.maximum(further, 0.0, out=further)
        further /= budget
        step = c_mean
        step += self.a_budget
        np.maximum(step, 0.0, out=step)
        further *= step
        cost: np.ndarray = np.add(self.wait, d_new, out=first_new)
        cost += further
        stall = np.subtract(d_new, view.d_old, out=mean_new)
        stall *= self.stalled
        cost += stall
        return cost

    def place(self, index: int, uncached: float, tokens: int) -> RankKey:
        """Record the request placed on rank ``index``: ``uncached`` tokens more to prefill there (``tokens`` the
        whole prompt, for the decode-aware loads); returns the rank."""
        key = self.loads[index].key
        instance = int(self.instance[index])
        sl = self.slices[instance]
        if self.next_level[index] == 0:
            self.waiting_next[instance] += 1
            self.stalled[sl] = self.waiting_next[instance] + self.weight * self.running[instance]
        self.level[index] += uncached
        self.empty[index] = self.level[index] <= 0
        self.next_level[index] += uncached
        self.first_before = float(self.first[index])
        self.first[index] = min(self.next_level[index], self.budget[index])
        self.magnitude += 2 * abs(uncached)
        self.whole = self.whole and self.magnitude < 2**53 and float(uncached).is_integer()
        for view in self.models.values():
            if view.mask[index]:
                self._refresh(view, instance, index, uncached)
        if self.decode is not None:
            self.decode.place(key, tokens)
            load = self.decode.loads[key]
            self.requests[index] = load.requests
            self.kv[index] = load.kv_tokens
            self.bucket[index] = load.requests // self.decode.bucket
            self._outliers(instance, index)
        return key


_ENGINE = operator.attrgetter("engine")
_RANK = operator.attrgetter("rank")


def _whole(values: np.ndarray) -> bool:
    return bool(np.all(values == np.floor(values)))


class PhaseAware:
    """The ``phase_aware`` allocator: :func:`phase_fill` with its settings (``allocator`` section, kind
    ``phase_aware``), the decode-aware choice (``decode`` section, ``None`` when off) and the step clock the
    scheduler feeds with token arrivals."""

    def __init__(
        self,
        settings: PhaseAwareConfig,
        decode: DecodeConfig | None,
        clock: StepClock,
        prefix: PrefixIndex | None = None,
    ) -> None:
        self.settings = settings
        self.decode = decode
        self.clock = clock
        self.prefix = prefix
        self.queue_steps = math.inf if settings.queue_steps is None else settings.queue_steps
        kernel.load()  # compiled (or loaded from numba's cache) now, not inside the first window

    def place(self, batch: Sequence[PendingRequest], ranks: Sequence[RankLoad], now: float) -> Allocation:
        """Place a window's batch (see :func:`phase_fill`)."""
        settings = self.settings
        return phase_fill(
            batch,
            ranks,
            self.clock,
            self.clock.current_step_tokens,
            now=now,
            max_wait_s=settings.max_wait_s,
            queue_steps=self.queue_steps,
            min_queue_tokens=settings.min_queue_tokens,
            decode_stall_weight=settings.decode_stall_weight,
            decode=decode_ranker(ranks, self.decode),
            use_step_phase=settings.use_step_phase,
            shortest_first=settings.shortest_first,
            long_prefill_tokens=settings.long_prefill_tokens,
            prefix=self.prefix,
        )
