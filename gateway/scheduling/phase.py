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

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.scheduling.allocation import decode_load_key, fits, placement_order
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
