"""Straightforward reference implementations of the window allocators and the decode-aware ranker: the code as
it was before the cluster-scale restructuring (a scan of every rank per request, the outliers recomputed from
scratch after every placement). ``test_allocation_reference.py`` checks the package's placements against them on
seeded random windows."""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.scheduling.allocation import (
    DEFAULT_QUEUE_STEPS,
    KV_HIGH_WATERMARK,
    capacity_tokens,
    decode_load_key,
    fits,
    placement_order,
)
from gateway.scheduling.baselines.prefix_hash import VIRTUAL_NODES, _position
from gateway.scheduling.decode import IQR_K, RUNNING_BUCKET, DecodeLoad, iqr_outliers, lexicographic_key
from gateway.scheduling.phase import DECODE_STALL_WEIGHT
from gateway.scheduling.prefix_index import PrefixIndex
from gateway.scheduling.step_clock import StepClock
from gateway.scheduling.types import Allocation
from gateway.types import PendingRequest, RankKey, RankLoad


class ReferenceRanker:
    """The decode-aware preference, its outliers recomputed from scratch after every placement.

    Args:
        ranks: a snapshot of the ranks.
        iqr_k: fence multiplier, or ``None`` to call no rank an outlier (the IQR step switched off).
        bucket: bucket width of the requests objective (>= 1).

    Raises:
        ValueError: ``bucket < 1`` or a negative ``iqr_k``.
    """

    def __init__(self, ranks: Sequence[RankLoad], *, iqr_k: float | None = IQR_K, bucket: int = RUNNING_BUCKET):
        if bucket < 1:
            raise ValueError(f"bucket must be >= 1, got {bucket}")
        if iqr_k is not None and iqr_k < 0:
            raise ValueError(f"iqr_k must be >= 0, got {iqr_k}")
        self.iqr_k = iqr_k
        self.bucket = bucket
        self.loads = {r.key: DecodeLoad.of(r) for r in ranks}
        self._groups: dict[str, list[RankKey]] = {}
        for r in ranks:
            self._groups.setdefault(r.key.engine, []).append(r.key)
        self._outliers: dict[str, frozenset[RankKey]] = {}

    def outliers(self, engine: str) -> frozenset[RankKey]:
        """Outlier ranks of ``engine``'s group (cached until :meth:`place` changes the group)."""
        cached = self._outliers.get(engine)
        if cached is None:
            if self.iqr_k is None:
                cached = frozenset()
            else:
                group = {key: self.loads[key] for key in self._groups.get(engine, [])}
                cached = iqr_outliers(group, self.iqr_k, self.bucket)
            self._outliers[engine] = cached
        return cached

    def is_outlier(self, rank: RankKey) -> bool:
        """Whether ``rank`` is an outlier of its group (see :meth:`outliers`)."""
        return rank in self.outliers(rank.engine)

    def key(self, rank: RankKey) -> tuple[int, int, float]:
        """Preference key of ``rank`` with what was placed on it so far: non-outliers first, then the
        lexicographic key (smaller is better)."""
        return (int(self.is_outlier(rank)), *lexicographic_key(self.loads[rank], self.bucket))

    def place(self, rank: RankKey, prompt_tokens: float) -> None:
        """Record a request of ``prompt_tokens`` tokens placed on ``rank``."""
        self.loads[rank] = self.loads[rank].plus(prompt_tokens)
        self._outliers.pop(rank.engine, None)


def _headroom(serving: Sequence[RankLoad], level: dict[RankKey, float], queue_steps: float, min_tokens: float) -> float:
    best = -math.inf
    for r in serving:
        if r.kv_usage is not None and r.kv_usage >= KV_HIGH_WATERMARK:
            continue
        if level[r.key] <= 0:
            return math.inf
        best = max(best, capacity_tokens(r, queue_steps, min_tokens) - level[r.key])
    return best


def reference_water_fill(
    batch: Sequence[PendingRequest],
    ranks: Sequence[RankLoad],
    *,
    now: float,
    max_wait_s: float,
    queue_steps: float = DEFAULT_QUEUE_STEPS,
    min_queue_tokens: float = 0.0,
    decode: ReferenceRanker | None = None,
    shortest_first: bool = False,
) -> Allocation:
    """Place a window's batch on DP ranks by prefill water-filling.

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
    serving_by_model: dict[str, list[RankLoad]] = {}
    # Per model: the most prompt tokens any serving rank can still take (inf if one is idle), so that
    # requests which fit nowhere are deferred without scanning every rank (windows can hold thousands).
    headroom: dict[str, float] = {}
    order = placement_order(batch, shortest_first)
    for request in order:
        serving = serving_by_model.get(request.model)
        if serving is None:
            serving = serving_by_model[request.model] = [r for r in usable if request.model in r.models]
            headroom[request.model] = _headroom(serving, level, queue_steps, min_queue_tokens)
        if not serving:
            result.unplaceable.append(request)
            continue
        young = now - request.arrival_s < max_wait_s
        if young and request.prompt_tokens > headroom[request.model]:
            result.deferred.append(request)
            continue
        fitting = [r for r in serving if fits(level[r.key], request.prompt_tokens, r, queue_steps, min_queue_tokens)]
        if not fitting:
            if now - request.arrival_s < max_wait_s:
                result.deferred.append(request)
                continue
            fitting = serving
        if decode is None:
            best = min(fitting, key=lambda r: (level[r.key], decode_load_key(r), r.key))
        else:
            ranked = decode
            best = min(fitting, key=lambda r: (level[r.key], ranked.key(r.key), r.key))
            ranked.place(best.key, request.prompt_tokens)
        level[best.key] += request.prompt_tokens
        result.assigned.append((request, best.key))
        for model, ranks_of_model in serving_by_model.items():
            if best in ranks_of_model:
                headroom[model] = _headroom(ranks_of_model, level, queue_steps, min_queue_tokens)
    result.deferred.sort(key=lambda q: q.arrival_s)
    return result


@dataclass(slots=True)
class _Instance:
    ranks: list[RankLoad]
    busy: bool
    running: float


def _placement_cost(
    clock: StepClock,
    engine: str,
    tokens: float,
    next_level: float,
    budget: float,
    heaviest: float,
    mean: float,
    ranks: int,
    wait: float,
    stalled: float,
) -> float:
    """Predicted cost of placing ``tokens`` prompt tokens on a rank of ``engine`` (the module docstring's formula),
    seconds.

    Args:
        clock: the step clock (the instance's step-time model).
        engine: the instance ``e``.
        tokens: the request's prompt tokens ``t``.
        next_level: prompt tokens already queued on the rank for the steps after the one in progress.
        budget: the rank's per-step prefill budget.
        heaviest: ``H_e``, the heaviest rank's prefill tokens bound for the next step.
        mean: ``S_e``, the ranks' mean prefill tokens bound for the next step.
        ranks: the instance's DP ranks.
        wait: ``wait(e)``, seconds until the instance starts its next step.
        stalled: ``n_e + w * running_e``, the requests a longer next step holds up.
    """
    total = next_level + tokens
    first_old = min(next_level, budget)
    first_new = min(total, budget)
    mean_new = mean + (first_new - first_old) / ranks
    d_old = clock.predict(engine, heaviest, mean)
    d_new = clock.predict(engine, max(heaviest, first_new), mean_new)
    own = wait + d_new + max(0.0, total - budget) / budget * clock.predict(engine, budget, mean_new)
    return own + (d_new - d_old) * stalled


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


def reference_phase_fill(
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
    decode: ReferenceRanker | None = None,
    use_step_phase: bool = True,
    shortest_first: bool = False,
    long_prefill_tokens: float | None = None,
    prefix: PrefixIndex | None = None,
) -> Allocation:
    """Place a batch by predicted time to first token (see the module docstring).

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
            first-token time stays first (``bench/results/decisions.md#iqr-outliers``).
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
    """
    result = Allocation()
    level = {r.key: r.queued_prefill_tokens for r in ranks}
    next_level = {r.key: max(0.0, r.queued_prefill_tokens - current_step_tokens.get(r.key, 0.0)) for r in ranks}
    instances: dict[str, _Instance] = {}
    for r in ranks:
        inst = instances.setdefault(r.key.engine, _Instance([], False, 0.0))
        inst.busy = inst.busy or r.running > 0 or r.waiting > 0
        inst.running += r.running
        if r.usable:
            inst.ranks.append(r)
    waiting_next = {e: sum(1 for r in inst.ranks if next_level[r.key] > 0) for e, inst in instances.items()}
    staged: dict[int, list[tuple[RankKey, tuple[int, ...]]]] = {}  # first block -> this batch's placements
    for request in placement_order(batch, shortest_first):
        t = request.prompt_tokens
        matched = _matched(prefix, staged, request.prefix_blocks) if prefix is not None else {}
        forced = now - request.arrival_s >= max_wait_s
        best: tuple[tuple[float, ...], RankLoad, int] | None = None
        serves = False
        for engine, inst in instances.items():
            candidates = [r for r in inst.ranks if request.model in r.models]
            if not candidates:
                continue
            serves = True
            uncached_of = (
                {}
                if prefix is None
                else {r.key: t - prefix.cached_tokens(matched[r.key], t) for r in candidates if r.key in matched}
            )
            fitting = [
                r
                for r in candidates
                if forced or fits(level[r.key], uncached_of.get(r.key, t), r, queue_steps, min_queue_tokens)
            ]
            if not fitting:
                continue
            mismatch = 0.0
            if long_prefill_tokens is not None:
                slow = any(level[r.key] > long_prefill_tokens for r in candidates)
                mismatch = float(slow != (t > long_prefill_tokens))
            firsts = [min(next_level[r.key], r.prefill_budget) for r in candidates]
            heaviest, mean = max(firsts), sum(firsts) / len(firsts)
            total_level = sum(level[r.key] for r in candidates)
            wait = clock.time_to_next_step(engine, now) if inst.busy and use_step_phase else 0.0
            stalled = waiting_next[engine] + decode_stall_weight * inst.running
            for r in fitting:
                work = uncached_of.get(r.key, t)
                cost = _placement_cost(
                    clock,
                    engine,
                    work,
                    next_level[r.key],
                    r.prefill_budget,
                    heaviest,
                    mean,
                    len(candidates),
                    wait,
                    stalled,
                )
                key: tuple[float, ...]
                if decode is None:
                    key = (mismatch, cost, work, next_level[r.key], total_level, *decode_load_key(r))
                else:
                    key = (mismatch, cost, work, *decode.key(r.key), next_level[r.key], total_level)
                if best is None or key < best[0]:
                    best = (key, r, work)
        if best is None:
            (result.deferred if serves else result.unplaceable).append(request)
            continue
        chosen, uncached = best[1], best[2]
        if next_level[chosen.key] == 0:
            waiting_next[chosen.key.engine] += 1
        level[chosen.key] += uncached
        next_level[chosen.key] += uncached
        if prefix is not None and request.prefix_blocks:
            staged.setdefault(request.prefix_blocks[0], []).append((chosen.key, request.prefix_blocks))
        if decode is not None:
            decode.place(chosen.key, t)
        result.assigned.append((request, chosen.key))
    result.deferred.sort(key=lambda q: q.arrival_s)
    return result


def reference_rotating_pick(
    start: int, candidates: list[RankLoad], load: Callable[[RankLoad], float]
) -> tuple[RankKey, int]:
    """:class:`~gateway.scheduling.baselines.base.Rotating`'s choice as a scan of the rotated candidates: the rank
    and the next start."""
    n = len(candidates)
    start %= n
    rotated = candidates[start:] + candidates[:start]
    best = min(range(n), key=lambda i: load(rotated[i]))
    return rotated[best].key, start + best + 1


def reference_prefix_hash_target(candidates: list[RankLoad], head: int) -> RankKey:
    """The rank ``prefix_hash`` hashes a prompt head to, its ring built afresh from the candidates' keys."""
    entries = sorted((_position(f"{r.key}#{v}"), r.key) for r in candidates for v in range(VIRTUAL_NODES))
    positions = [p for p, _ in entries]
    return entries[bisect.bisect_left(positions, _position(str(head))) % len(entries)][1]
