"""The window allocators' per-request loops, compiled with numba (imported only through
:func:`gateway.scheduling.kernel.load`).

Each kernel is the whole placement of a window over flat arrays: for every request in placement order, its prefix
hits (the prefix index's holders and this batch's earlier placements, through a trie of the batch's blocks), the
fitting ranks, the cost or level of each, the lexicographic choice, and the update of what the placement changes
(the rank's levels, its instance's next-step figures per model, the decode-aware loads and fences). Every
floating-point operation is the one the Python code performs, in the same order (numba compiles without
fast-math, so no reassociation and no fused multiply-add), and sums that Python computes with :func:`sum` use
its algorithm (:func:`_python_sum`), so the placements are the Python code's
(``tests/unit/test_allocation_reference.py``).

``phase_kernel`` looks at the instances in the order of a lower bound on their ranks' costs for the request and
skips those whose bound exceeds the best cost found, and those where no rank has room for it (the lowest level plus
the request above the highest capacity). Within an instance of one budget with whole token figures, the ranks fall
into three regions by their next-step level, over two of which the cost is non-decreasing in that level and over
the third bounded by a figure that is: the ranks kept in the tie-break's key order give the best of the first
region after a few looks, and the ranks kept in the order of their level are walked up each region until its bound
exceeds the best cost. Elsewhere, where the instance's bound is met exactly, the key order gives the best after a
few looks; otherwise the instance is one pass over its ranks (``bench/results/allocation_scale.md``).
``water_kernel`` is one pass over the ranks serving the request's model. The helpers are compiled into the loops
(``_inlined``): a call of a compiled function with array arguments costs their reference counts on every call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba
import numpy as np

_F = TypeVar("_F", bound=Callable[..., Any])


def _compiled(fn: _F) -> _F:
    """``numba.njit`` without the GIL, cached on disk where a cache directory is writable (next to this file, else
    numba's user-wide cache, or ``NUMBA_CACHE_DIR``); compiled in each process otherwise."""
    try:
        return cast(_F, numba.njit(cache=True, nogil=True)(fn))
    except RuntimeError:  # no writable cache location: compile in every process
        return cast(_F, numba.njit(cache=False, nogil=True)(fn))


def _inlined(fn: _F) -> _F:
    """A helper compiled into its callers (numba's ``inline="always"``): a call passing arrays otherwise costs
    their reference counts and unpacked descriptors, more than the comparisons it makes."""
    return cast(_F, numba.njit(inline="always")(fn))


@_compiled
def _python_sum(values: np.ndarray, compensated: bool) -> float:
    """``sum(values.tolist())`` as CPython computes it: left to right before 3.12; from 3.12 on with Neumaier's
    compensation (CPython ``Python/bltinmodule.c``, ``builtin_sum_impl``), the compensation added at the end when
    it is non-zero and finite."""
    total = 0.0
    c = 0.0
    for i in range(values.shape[0]):
        x = values[i]
        if not compensated:
            total += x
            continue
        t = total + x
        if abs(total) >= abs(x):
            c += (total - t) + x
        else:
            c += (x - t) + total
        total = t
    if compensated and c != 0.0 and math.isfinite(c):
        total += c
    return total


@_inlined
def _quartiles(ordered: np.ndarray, start: int, stop: int) -> tuple[float, float]:
    """``(Q1, Q3)`` of the sorted values ``ordered[start:stop]``, as :func:`gateway.scheduling.decode._quartiles`."""
    m = stop - start - 1
    j = m // 4
    delta = m % 4
    q1 = (ordered[start + j] * float(4 - delta) + ordered[start + j + 1] * float(delta)) / 4.0
    j = (3 * m) // 4
    delta = (3 * m) % 4
    q3 = (ordered[start + j] * float(4 - delta) + ordered[start + j + 1] * float(delta)) / 4.0
    return q1, q3


@_inlined
def _fences(
    e: int,
    g_start: np.ndarray,
    g_requests: np.ndarray,
    g_kv: np.ndarray,
    g_requests_sorted: np.ndarray,
    g_kv_sorted: np.ndarray,
    g_exact: np.ndarray,
    g_sums: np.ndarray,
    g_on: np.ndarray,
    iqr_k: float,
    bucket: float,
    compensated: bool,
    fences: np.ndarray,
) -> None:
    """Set ``fences[e]`` to instance ``e``'s ``(requests fence, KV fence)``
    (:meth:`gateway.scheduling.decode.DecodeRanker.fences`)."""
    if not g_on[e]:
        fences[e, 0] = math.inf
        fences[e, 1] = math.inf
        return
    lo = g_start[e]
    hi = g_start[e + 1]
    if g_exact[e]:
        total_requests = g_sums[e, 0]
        total_kv = g_sums[e, 1]
    else:
        total_requests = _python_sum(g_requests[lo:hi], compensated)
        total_kv = _python_sum(g_kv[lo:hi], compensated)
    kv_per_request = total_kv / total_requests if total_requests != 0.0 else 0.0
    q1, q3 = _quartiles(g_requests_sorted, lo, hi)
    fences[e, 0] = q3 + iqr_k * max(q3 - q1, bucket)
    q1, q3 = _quartiles(g_kv_sorted, lo, hi)
    fences[e, 1] = q3 + iqr_k * max(q3 - q1, bucket * kv_per_request)


@_inlined
def _replace_sorted(ordered: np.ndarray, start: int, stop: int, old: float, new: float) -> None:
    """Replace one ``old`` by ``new`` (>= ``old``) in the sorted ``ordered[start:stop]``: the last ``old`` found by
    bisection, the values up to ``new``'s place moved down by one."""
    i = np.searchsorted(ordered[start:stop], old, side="right") + start - 1
    while i + 1 < stop and ordered[i + 1] < new:
        ordered[i] = ordered[i + 1]
        i += 1
    ordered[i] = new


@_inlined
def _decode_place(
    r: int,
    e: int,
    tokens: float,
    requests: np.ndarray,
    kv: np.ndarray,
    g_pos: np.ndarray,
    g_start: np.ndarray,
    g_requests: np.ndarray,
    g_kv: np.ndarray,
    g_requests_sorted: np.ndarray,
    g_kv_sorted: np.ndarray,
    g_exact: np.ndarray,
    g_sums: np.ndarray,
    g_on: np.ndarray,
    iqr_k: float,
    bucket: float,
    compensated: bool,
    fences: np.ndarray,
) -> None:
    """A request of ``tokens`` prompt tokens placed on rank ``r`` of instance ``e``: its decode objectives, its
    group's sorted objectives, sums and fences follow (:meth:`gateway.scheduling.decode.DecodeRanker.place`)."""
    old_requests = requests[r]
    old_kv = kv[r]
    requests[r] = old_requests + 1.0
    kv[r] = old_kv + tokens
    p = g_pos[r]
    if p < 0:
        return
    g_requests[p] = requests[r]
    g_kv[p] = kv[r]
    lo = g_start[e]
    hi = g_start[e + 1]
    _replace_sorted(g_requests_sorted, lo, hi, old_requests, requests[r])
    _replace_sorted(g_kv_sorted, lo, hi, old_kv, kv[r])
    g_sums[e, 0] += 1.0
    g_sums[e, 1] += tokens
    g_sums[e, 2] += 1.0 + tokens
    g_exact[e] = g_exact[e] and g_sums[e, 2] < 2.0**53 and tokens == math.floor(tokens)
    _fences(e, g_start, g_requests, g_kv, g_requests_sorted, g_kv_sorted, g_exact, g_sums, g_on, iqr_k, bucket,
            compensated, fences)  # fmt: skip


@_inlined
def _slot(table: np.ndarray, key: int) -> int:
    """Open addressing: the slot of ``key`` in ``table`` (size a power of two, ``-1`` for empty), or the empty
    slot where it would go."""
    mask: int = table.shape[0] - 1
    i: int = (key * 2654435761) & mask
    while table[i] != -1 and table[i] != key:
        i = (i + 1) & mask
    return i


@_compiled
def _trie(b_off: np.ndarray, b_ids: np.ndarray, distinct: int) -> np.ndarray:
    """The node of each block of each request in a trie of the requests' block sequences: two requests' blocks at
    depth ``d`` share a node exactly when their first ``d + 1`` blocks are equal."""
    size = 1
    while size < 2 * (b_ids.shape[0] + 1):
        size *= 2
    keys = np.full(size, -1, dtype=np.int64)
    values = np.empty(size, dtype=np.int64)
    nodes = np.empty(b_ids.shape[0], dtype=np.int64)
    count = 0
    for j in range(b_off.shape[0] - 1):
        parent = -1
        for k in range(b_off[j], b_off[j + 1]):
            key = (parent + 1) * distinct + b_ids[k]
            s = _slot(keys, key)
            if keys[s] == -1:
                keys[s] = key
                values[s] = count
                count += 1
            parent = values[s]
            nodes[k] = parent
    return nodes


@_inlined
def _prefix_hits(
    j: int,
    tokens: int,
    b_off: np.ndarray,
    b_ids: np.ndarray,
    nodes: np.ndarray,
    h_off: np.ndarray,
    h_rank: np.ndarray,
    s_head: np.ndarray,
    s_next: np.ndarray,
    s_rank: np.ndarray,
    block_tokens: int,
    depth: np.ndarray,
    hit: np.ndarray,
    touched: np.ndarray,
) -> int:
    """Set ``hit[r]``, the prompt tokens of request ``j`` rank ``r``'s prefix cache probably holds, for every rank
    holding its first block: in the index (the longest run of leading blocks it holds,
    :meth:`gateway.scheduling.prefix_index.PrefixIndex.match`) or placed there earlier in this batch (the longest
    common prefix with such a request); returns how many ranks are listed in ``touched``."""
    lo = b_off[j]
    hi = b_off[j + 1]
    n_touched = 0
    if hi == lo:
        return 0
    first = b_ids[lo]
    for h in range(h_off[first], h_off[first + 1]):
        r = h_rank[h]
        depth[r] = 1
        touched[n_touched] = r
        n_touched += 1
    for k in range(lo + 1, hi):
        advanced = False
        d = k - lo
        block = b_ids[k]
        for h in range(h_off[block], h_off[block + 1]):
            r = h_rank[h]
            if depth[r] == d:
                depth[r] = d + 1
                advanced = True
        if not advanced:
            break
    for k in range(lo, hi):
        d = k - lo + 1
        e = s_head[nodes[k]]
        while e != -1:
            r = s_rank[e]
            if depth[r] == 0:
                touched[n_touched] = r
                n_touched += 1
            if depth[r] < d:
                depth[r] = d
            e = s_next[e]
    for i in range(n_touched):
        r = touched[i]
        hit[r] = max(0, min(tokens - 1, depth[r] * block_tokens))
    return n_touched


@_inlined
def _stage(
    j: int,
    r: int,
    n: int,
    b_off: np.ndarray,
    nodes: np.ndarray,
    s_head: np.ndarray,
    s_next: np.ndarray,
    s_rank: np.ndarray,
    s_seen: np.ndarray,
    s_count: np.ndarray,
) -> None:
    """Request ``j`` placed on rank ``r``: each node of its blocks lists ``r`` (once)."""
    for k in range(b_off[j], b_off[j + 1]):
        key = nodes[k] * n + r
        s = _slot(s_seen, key)
        if s_seen[s] == key:
            continue
        s_seen[s] = key
        e = s_count[0]
        s_count[0] = e + 1
        s_rank[e] = r
        s_next[e] = s_head[nodes[k]]
        s_head[nodes[k]] = e


@_inlined
def _refresh(
    mm: int,
    e: int,
    r: int,
    added: float,
    first_before: float,
    incremental: bool,
    inst_start: np.ndarray,
    mask: np.ndarray,
    first: np.ndarray,
    level: np.ndarray,
    count: np.ndarray,
    heaviest: np.ndarray,
    first_sum: np.ndarray,
    level_sum: np.ndarray,
    slow: np.ndarray,
    mean: np.ndarray,
    d_old: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    c: np.ndarray,
    long_on: bool,
    long_tokens: float,
    compensated: bool,
    scratch: np.ndarray,
) -> None:
    """Instance ``e``'s next-step figures over model ``mm``'s candidates (``gateway.scheduling.phase._Cluster.
    _refresh``): recomputed as the Python code computes them, or, after a placement of ``added`` tokens on rank
    ``r`` with whole token figures, followed incrementally."""
    if count[mm, e] == 0:
        return
    if not incremental:
        k = 0
        top = -math.inf
        high = -math.inf
        for i in range(inst_start[e], inst_start[e + 1]):
            if mask[mm, i]:
                scratch[k] = first[i]
                top = max(top, first[i])
                high = max(high, level[i])
                k += 1
        heaviest[mm, e] = top
        first_sum[mm, e] = _python_sum(scratch[:k], compensated)
        k = 0
        for i in range(inst_start[e], inst_start[e + 1]):
            if mask[mm, i]:
                scratch[k] = level[i]
                k += 1
        level_sum[mm, e] = _python_sum(scratch[:k], compensated)
        slow[mm, e] = long_on and high > long_tokens
    else:
        heaviest[mm, e] = max(heaviest[mm, e], first[r])
        first_sum[mm, e] += first[r] - first_before
        level_sum[mm, e] += added
        slow[mm, e] = long_on and (slow[mm, e] or level[r] > long_tokens)
    mean[mm, e] = first_sum[mm, e] / count[mm, e]
    d_old[mm, e] = max(0.0, a[e] + b[e] * heaviest[mm, e] / 1000.0 + c[e] * mean[mm, e] / 1000.0)


@_compiled
def phase_kernel(
    # the usable ranks, instance by instance
    inst: np.ndarray,
    inst_start: np.ndarray,
    level: np.ndarray,
    next_level: np.ndarray,
    budget: np.ndarray,
    capacity: np.ndarray,
    open_: np.ndarray,
    first: np.ndarray,
    a_budget: np.ndarray,
    mask: np.ndarray,
    # the instances
    a: np.ndarray,
    b: np.ndarray,
    c: np.ndarray,
    wait: np.ndarray,
    running: np.ndarray,
    waiting_next: np.ndarray,
    weight: float,
    magnitude: float,
    whole: bool,
    long_on: bool,
    long_tokens: float,
    compensated: bool,
    # decode-aware choice
    decode_on: bool,
    requests: np.ndarray,
    kv: np.ndarray,
    bucket: float,
    iqr_k: float,
    g_pos: np.ndarray,
    g_start: np.ndarray,
    g_requests: np.ndarray,
    g_kv: np.ndarray,
    g_requests_sorted: np.ndarray,
    g_kv_sorted: np.ndarray,
    g_exact: np.ndarray,
    g_sums: np.ndarray,
    g_on: np.ndarray,
    tie_running: np.ndarray,
    tie_kv_usage: np.ndarray,
    tie_kv_tokens: np.ndarray,
    # the requests, in placement order
    tokens: np.ndarray,
    forced: np.ndarray,
    model: np.ndarray,
    sorted_idx: np.ndarray,
    # prefix hits
    prefix_on: bool,
    b_off: np.ndarray,
    b_ids: np.ndarray,
    distinct: int,
    h_off: np.ndarray,
    h_rank: np.ndarray,
    block_tokens: int,
) -> np.ndarray:
    """:func:`gateway.scheduling.phase.phase_fill`'s placement loop: for each request the index of its rank, or
    ``-1`` when it fits nowhere. The arrays are those of ``phase._Cluster`` (levels are updated in place)."""
    n = level.shape[0]
    n_inst = a.shape[0]
    n_models = mask.shape[0]
    n_req = tokens.shape[0]
    choice = np.full(n_req, -1, dtype=np.int64)
    stalled = np.empty(n_inst)
    for e in range(n_inst):
        stalled[e] = float(waiting_next[e]) + weight * running[e]
    count = np.zeros((n_models, n_inst))
    for mm in range(n_models):
        for i in range(n):
            if mask[mm, i]:
                count[mm, inst[i]] += 1.0
    heaviest = np.zeros((n_models, n_inst))
    first_sum = np.zeros((n_models, n_inst))
    level_sum = np.zeros((n_models, n_inst))
    slow = np.zeros((n_models, n_inst), dtype=np.bool_)
    mean = np.zeros((n_models, n_inst))
    d_old = np.zeros((n_models, n_inst))
    scratch = np.empty(n)
    for mm in range(n_models):
        for e in range(n_inst):
            _refresh(mm, e, 0, 0.0, 0.0, False, inst_start, mask, first, level, count, heaviest, first_sum,
                     level_sum, slow, mean, d_old, a, b, c, long_on, long_tokens, compensated, scratch)  # fmt: skip
    fences = np.empty((n_inst, 2))
    if decode_on:
        for e in range(n_inst):
            _fences(e, g_start, g_requests, g_kv, g_requests_sorted, g_kv_sorted, g_exact, g_sums, g_on, iqr_k,
                    bucket, compensated, fences)  # fmt: skip
    # prefix state
    total_blocks = b_ids.shape[0]
    nodes = _trie(b_off, b_ids, distinct) if prefix_on else np.empty(0, dtype=np.int64)
    s_head = np.full(total_blocks, -1, dtype=np.int64)
    s_next = np.empty(total_blocks, dtype=np.int64)
    s_rank = np.empty(total_blocks, dtype=np.int64)
    size = 1
    while size < 2 * (total_blocks + 1):
        size *= 2
    s_seen = np.full(size, -1, dtype=np.int64)
    s_count = np.zeros(1, dtype=np.int64)
    depth = np.zeros(n, dtype=np.int64)
    hit = np.zeros(n, dtype=np.int64)
    touched = np.empty(n, dtype=np.int64)
    bound = np.empty(n_inst)
    least_work = np.empty(n_inst)
    by_bound = np.arange(n_inst)
    least_budget = np.full(n_inst, math.inf)
    for i in range(n):
        least_budget[inst[i]] = min(least_budget[inst[i]], budget[i])
    bucketed = requests // bucket if decode_on else np.zeros(n)
    cand = np.empty(n, dtype=np.int64)
    position = np.empty(n, dtype=np.int64)
    for k in range(n):
        position[sorted_idx[k]] = k
    # each instance's ranks in the order of their next-step level, then index (the cost regions' walk), and whether
    # all its ranks have one budget, a positive whole number (so that q <= B - t exactly when q + t <= B)
    q_idx = np.empty(n, dtype=np.int64)
    q_pos = np.empty(n, dtype=np.int64)
    uniform = np.zeros(n_inst, dtype=np.bool_)
    for e in range(n_inst):
        lo = inst_start[e]
        hi = inst_start[e + 1]
        same = True
        if hi > lo:
            ranked = np.argsort(next_level[lo:hi], kind="mergesort")
            for k in range(hi - lo):
                q_idx[lo + k] = lo + ranked[k]
                q_pos[lo + ranked[k]] = lo + k
                if budget[lo + k] != budget[lo]:
                    same = False
        uniform[e] = same and hi > lo and 0.0 < budget[lo] < 2.0**53 and budget[lo] == math.floor(budget[lo])
    # each instance's lowest level and highest capacity: where the one plus the request's tokens exceeds the other, no
    # rank of it has room
    least_level = np.empty(n_inst)
    most_capacity = np.full(n_inst, -math.inf)
    for e in range(n_inst):
        least_level[e] = _least_level(level, inst_start[e], inst_start[e + 1])
        for i in range(inst_start[e], inst_start[e + 1]):
            most_capacity[e] = max(most_capacity[e], capacity[i])
    # the bound holds where a longer step cannot shorten the prediction: d_e non-decreasing in H and S (b, c >= 0)
    # and the stall term non-negative (every operation of the cost then rounds monotonically)
    bounded = (b >= 0.0) & (c >= 0.0) & (wait >= 0.0)
    for j in range(n_req):
        t = tokens[j]
        mm = model[j]
        n_touched = 0
        if prefix_on:
            n_touched = _prefix_hits(j, t, b_off, b_ids, nodes, h_off, h_rank, s_head, s_next, s_rank, block_tokens,
                                     depth, hit, touched)  # fmt: skip
        # the fitting ranks (phase._Cluster.best): with long-prefill isolation, those of the instances whose
        # slowness matches the request's length first, the others only if none of those fits
        long_request = long_on and float(t) > long_tokens
        best = -1
        best_cost = math.inf
        best_key = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        # Instances by their lower bound for this request: no rank of instance e takes fewer than w_e prompt
        # tokens (the request's, less the largest prefix hit there) nor has a budget below B_e, so its next step's
        # heaviest rank carries at least max(H_e, min(w_e, B_e)) and its mean at least S_e; with b, c >= 0 and a
        # non-negative stall weight every operation of the cost rounds monotonically, so
        #     wait(e) + d_lb + (d_lb - d_e(H_e, S_e)) * stalled_e,  d_lb = d_e(max(H_e, min(w_e, B_e)), S_e)
        # bounds every rank's cost from below, floats included. Once it exceeds the best cost the instance is
        # skipped; where a rank meets it exactly (nothing queued, say), that rank is at the instance's floor.
        for e in range(n_inst):
            least_work[e] = float(t)
        for k in range(n_touched):
            i = touched[k]
            least_work[inst[i]] = min(least_work[inst[i]], float(t - hit[i]))
        for e in range(n_inst):
            top = max(heaviest[mm, e], min(least_work[e], least_budget[e]))
            d_lb = max(top * b[e] / 1000.0 + a[e] + c[e] * mean[mm, e] / 1000.0, 0.0)
            bound[e] = wait[e] + d_lb + (d_lb - d_old[mm, e]) * stalled[e]
        if n_inst <= 16:  # insertion sort in place: no allocation per request
            for e in range(n_inst):
                k = e
                while k > 0 and bound[by_bound[k - 1]] > bound[e]:
                    by_bound[k] = by_bound[k - 1]
                    k -= 1
                by_bound[k] = e
        else:
            by_bound = np.argsort(bound)
        for sweep in range(2 if long_on else 1):
            if sweep == 1 and best >= 0:
                break
            for p in range(n_inst):
                e = int(by_bound[p])
                if count[mm, e] == 0.0:
                    continue
                if long_on and (slow[mm, e] == long_request) != (sweep == 0):
                    continue
                if best >= 0 and bounded[e] and stalled[e] >= 0.0 and bound[e] > best_cost:
                    continue
                if not forced[j] and least_level[e] > 0.0 and least_level[e] + least_work[e] > most_capacity[e]:
                    continue  # no rank of it has room for the request (every level above 0, none low enough)
                n_e = count[mm, e]
                heavy = heaviest[mm, e]
                mean_e = mean[mm, e]
                d_old_e = d_old[mm, e]
                a_e = a[e]
                b_e = b[e]
                c_e = c[e]
                wait_e = wait[e]
                stalled_e = stalled[e]
                rf = fences[e, 0]
                kf = fences[e, 1]
                total_level = level_sum[mm, e]
                floor = bounded[e] and stalled_e >= 0.0
                lo = inst_start[e]
                hi = inst_start[e + 1]
                n_cand = -1  # every rank of the instance
                a_hi = lo  # regions walked up by next-step level (below): none
                b_lo = lo
                b_hi = lo
                c_lo = hi
                region = floor and whole and uniform[e]
                if region or (floor and hi - lo > WALK):
                    # The first rank in key order that fits, has no prefix hit, is no outlier and costs exactly
                    # `target` is the best of the ranks it stands for (none of them costs less; outliers and later keys
                    # lose the tie). Without cost regions (below) `target` is the instance's bound: the rank found
                    # stands for all the ranks without a hit, and it and the ranks with a hit are the candidates.
                    #
                    # Cost regions: with one budget B over the instance, whole token figures and t the request's
                    # tokens, the ranks without a hit fall by next-step level q into A (q <= B - t: the cost is
                    # non-decreasing in q), B (B - t < q < B: the cost is at least _cost with the rank's next-step
                    # tokens taken as B already, a figure non-decreasing in q) and C (q >= B: non-decreasing in q);
                    # every operation of _cost rounds monotonically where the instance is at a floor (b, c, wait and
                    # the stall weight non-negative), so these hold for the floats. `target` is then the cost at A's
                    # lowest level, the walk in key order looks at A's ranks only and the rank found stands for A;
                    # when none is found A is walked up by level. B and C are walked up by level, each until its
                    # bound exceeds the best cost: a rank of it above that point cannot win.
                    target = bound[e]
                    limit = math.inf
                    a_end = lo
                    b_end = hi
                    if region:
                        budget_e = budget[lo]
                        limit = budget_e - float(t)
                        a_end = _first_above(next_level, q_idx, lo, hi, limit, True)
                        b_end = _first_above(next_level, q_idx, a_end, hi, budget_e, False)
                        if a_end > lo:
                            i = q_idx[lo]
                            target = _cost(float(t), next_level[i], budget[i], first[i], a_budget[i], n_e, mean_e,
                                           heavy, a_e, b_e, c_e, wait_e, d_old_e, stalled_e)  # fmt: skip
                    found = -1
                    if not region or a_end > lo:
                        looked = 0
                        for k in range(lo, hi):
                            if looked == WALK:
                                break
                            i = sorted_idx[k]
                            if next_level[i] > limit:  # not in A
                                continue
                            looked += 1
                            if not mask[mm, i] or hit[i] != 0 or (decode_on and (requests[i] > rf or kv[i] > kf)):
                                continue
                            work = float(t)
                            if not forced[j] and not (open_[i] and (level[i] + work <= capacity[i] or level[i] <= 0.0)):
                                continue
                            cost = _cost(work, next_level[i], budget[i], first[i], a_budget[i], n_e, mean_e, heavy,
                                         a_e, b_e, c_e, wait_e, d_old_e, stalled_e)  # fmt: skip
                            if cost == target:
                                found = i
                                break
                    if found >= 0 or region:
                        n_cand = 0
                        if found >= 0:
                            cand[0] = found
                            n_cand = 1
                        for k in range(n_touched):
                            i = touched[k]
                            if inst[i] == e and hit[i] != 0:
                                cand[n_cand] = i
                                n_cand += 1
                    if region:
                        if found < 0:
                            a_hi = a_end
                        b_lo = a_end
                        b_hi = b_end
                        c_lo = b_end
                for k in range(hi - lo if n_cand < 0 else n_cand):
                    i = lo + k if n_cand < 0 else cand[k]
                    if not mask[mm, i]:
                        continue
                    work = float(t - hit[i])
                    if not forced[j] and not (open_[i] and (level[i] + work <= capacity[i] or level[i] <= 0.0)):
                        continue
                    out = decode_on and (requests[i] > rf or kv[i] > kf)
                    # at the instance's floor no rank of it costs less than the best: only a better key can win,
                    # so the key is compared before the cost is computed
                    at_floor = best >= 0 and floor and best_cost == bound[e]
                    if at_floor:
                        if decode_on:
                            better = _phase_better(work, out, bucketed[i], kv[i], next_level[i], total_level,
                                                   0.0, 0.0, 0.0, i, best_key, best)  # fmt: skip
                        else:
                            better = _phase_better(work, out, 0.0, 0.0, next_level[i], total_level, tie_running[i],
                                                   tie_kv_usage[i], tie_kv_tokens[i], i, best_key, best)  # fmt: skip
                        if not better:
                            continue
                    cost = _cost(work, next_level[i], budget[i], first[i], a_budget[i], n_e, mean_e, heavy, a_e, b_e,
                                 c_e, wait_e, d_old_e, stalled_e)  # fmt: skip
                    if best >= 0 and cost > best_cost:
                        continue
                    if best >= 0 and cost == best_cost and not at_floor:
                        if decode_on:
                            better = _phase_better(work, out, bucketed[i], kv[i], next_level[i], total_level,
                                                   0.0, 0.0, 0.0, i, best_key, best)  # fmt: skip
                        else:
                            better = _phase_better(work, out, 0.0, 0.0, next_level[i], total_level, tie_running[i],
                                                   tie_kv_usage[i], tie_kv_tokens[i], i, best_key, best)  # fmt: skip
                        if not better:
                            continue
                    best = i
                    best_cost = cost
                    if decode_on:
                        best_key = (work, 1.0 if out else 0.0, bucketed[i], kv[i], next_level[i], total_level, 0.0,
                                    0.0, 0.0)  # fmt: skip
                    else:
                        best_key = (work, 0.0, 0.0, 0.0, next_level[i], total_level, tie_running[i],
                                    tie_kv_usage[i], tie_kv_tokens[i])  # fmt: skip
                # regions A (when the walk in key order found nothing), B and C, each up from its lowest level
                for part in range(3):
                    k_from = lo if part == 0 else (b_lo if part == 1 else c_lo)
                    k_to = a_hi if part == 0 else (b_hi if part == 1 else hi)
                    for k in range(k_from, k_to):
                        i = q_idx[k]
                        if hit[i] != 0:
                            continue
                        work = float(t)
                        if not mask[mm, i]:
                            continue
                        if not forced[j] and not (open_[i] and (level[i] + work <= capacity[i] or level[i] <= 0.0)):
                            continue
                        # in B the rank's next-step tokens taken as its budget already: its cost's bound
                        cost = _cost(work, next_level[i], budget[i], budget[i] if part == 1 else first[i], a_budget[i],
                                     n_e, mean_e, heavy, a_e, b_e, c_e, wait_e, d_old_e, stalled_e)  # fmt: skip
                        if best >= 0 and cost > best_cost:
                            break  # and so do the bounds of the region's ranks above it, fitting or not
                        if part == 1:
                            cost = _cost(work, next_level[i], budget[i], first[i], a_budget[i], n_e, mean_e, heavy,
                                         a_e, b_e, c_e, wait_e, d_old_e, stalled_e)  # fmt: skip
                            if best >= 0 and cost > best_cost:
                                continue
                        out = decode_on and (requests[i] > rf or kv[i] > kf)
                        if best >= 0 and cost == best_cost:
                            if decode_on:
                                better = _phase_better(work, out, bucketed[i], kv[i], next_level[i], total_level,
                                                       0.0, 0.0, 0.0, i, best_key, best)  # fmt: skip
                            else:
                                better = _phase_better(work, out, 0.0, 0.0, next_level[i], total_level,
                                                       tie_running[i], tie_kv_usage[i], tie_kv_tokens[i], i, best_key,
                                                       best)  # fmt: skip
                            if not better:
                                continue
                        best = i
                        best_cost = cost
                        if decode_on:
                            best_key = (work, 1.0 if out else 0.0, bucketed[i], kv[i], next_level[i], total_level, 0.0,
                                        0.0, 0.0)  # fmt: skip
                        else:
                            best_key = (work, 0.0, 0.0, 0.0, next_level[i], total_level, tie_running[i],
                                        tie_kv_usage[i], tie_kv_tokens[i])  # fmt: skip
        if best >= 0:
            choice[j] = best
            uncached = float(t - hit[best])
            e = inst[best]
            if next_level[best] == 0.0:
                waiting_next[e] += 1
                stalled[e] = float(waiting_next[e]) + weight * running[e]
            level_before = level[best]
            level[best] += uncached
            if level_before == least_level[e]:
                least_level[e] = _least_level(level, inst_start[e], inst_start[e + 1])
            next_level[best] += uncached
            first_before = first[best]
            first[best] = min(next_level[best], budget[best])
            magnitude += 2.0 * abs(uncached)
            whole = whole and magnitude < 2.0**53 and uncached == math.floor(uncached)
            for other in range(n_models):
                if mask[other, best]:
                    _refresh(other, e, best, uncached, first_before, whole, inst_start, mask, first, level, count,
                             heaviest, first_sum, level_sum, slow, mean, d_old, a, b, c, long_on, long_tokens,
                             compensated, scratch)  # fmt: skip
            if decode_on:
                _decode_place(best, e, float(t), requests, kv, g_pos, g_start, g_requests, g_kv, g_requests_sorted,
                              g_kv_sorted, g_exact, g_sums, g_on, iqr_k, bucket, compensated, fences)  # fmt: skip
                bucketed[best] = requests[best] // bucket
            if prefix_on:
                _stage(j, best, n, b_off, nodes, s_head, s_next, s_rank, s_seen, s_count)
            # the rank's key only grew: it moves towards the end of its instance's key order
            k = position[best]
            hi = inst_start[e + 1]
            while k + 1 < hi:
                other = sorted_idx[k + 1]
                if decode_on:
                    ahead = _key_less(bucketed[other], kv[other], next_level[other], 0.0, other, bucketed[best],
                                      kv[best], next_level[best], 0.0, best)  # fmt: skip
                else:
                    ahead = _key_less(next_level[other], tie_running[other], tie_kv_usage[other],
                                      tie_kv_tokens[other], other, next_level[best], tie_running[best],
                                      tie_kv_usage[best], tie_kv_tokens[best], best)  # fmt: skip
                if not ahead:
                    break
                sorted_idx[k] = other
                position[other] = k
                k += 1
            sorted_idx[k] = best
            position[best] = k
            # its next-step level only grew: it moves up its instance's level order
            k = q_pos[best]
            while k + 1 < hi:
                other = q_idx[k + 1]
                if next_level[other] > next_level[best] or (next_level[other] == next_level[best] and other > best):
                    break
                q_idx[k] = other
                q_pos[other] = k
                k += 1
            q_idx[k] = best
            q_pos[best] = k
        for k in range(n_touched):
            depth[touched[k]] = 0
            hit[touched[k]] = 0
    return choice


WALK = 32
"""How many ranks of an instance (of its first cost region, with the regions) the key-order walk looks at before it
gives up and scans the instance (walks the region up by level); without the regions an instance of no more ranks is
scanned at once."""


@_inlined
def _least_level(level: np.ndarray, lo: int, hi: int) -> float:
    """The lowest of ``level[lo:hi]`` (``inf`` when empty; a NaN, which fits nowhere, is passed over)."""
    least = math.inf
    for i in range(lo, hi):
        if level[i] < least:
            least = level[i]
    return least


@_inlined
def _first_above(next_level: np.ndarray, q_idx: np.ndarray, lo: int, hi: int, value: float, strict: bool) -> int:
    """The first position in ``q_idx[lo:hi]`` (ranks by ascending next-step level) whose level is above ``value``
    (``strict``) or at least ``value``; ``hi`` when none is."""
    while lo < hi:
        mid = (lo + hi) // 2
        q = next_level[q_idx[mid]]
        if q > value or (not strict and q == value):
            hi = mid
        else:
            lo = mid + 1
    return lo


@_inlined
def _cost(
    work: float,
    next_level: float,
    budget: float,
    first: float,
    a_budget: float,
    count: float,
    mean: float,
    heaviest: float,
    a: float,
    b: float,
    c: float,
    wait: float,
    d_old: float,
    stalled: float,
) -> float:
    """A rank's predicted cost of ``work`` more prompt tokens (``gateway.scheduling.phase._Cluster._costs``, the same
    operations in the same order)."""
    total = next_level + work
    first_new = min(total, budget)
    mean_new = (first_new - first) / count + mean
    c_mean = c * mean_new / 1000.0
    d_new = max(max(heaviest, first_new) * b / 1000.0 + a + c_mean, 0.0)
    further = max(total - budget, 0.0) / budget * max(c_mean + a_budget, 0.0)
    return wait + d_new + further + (d_new - d_old) * stalled


@_inlined
def _key_less(x1: float, x2: float, x3: float, x4: float, xi: int, y1: float, y2: float, y3: float, y4: float,
              yi: int) -> bool:  # fmt: skip
    """``(x1, x2, x3, x4, xi) < (y1, y2, y3, y4, yi)`` lexicographically."""
    if x1 != y1:
        return x1 < y1
    if x2 != y2:
        return x2 < y2
    if x3 != y3:
        return x3 < y3
    if x4 != y4:
        return x4 < y4
    return xi < yi


@_inlined
def _phase_better(
    work: float,
    out: bool,
    bucketed: float,
    kv: float,
    next_level: float,
    total_level: float,
    running: float,
    kv_usage: float,
    kv_tokens: float,
    index: int,
    best: tuple[float, float, float, float, float, float, float, float, float],
    best_index: int,
) -> bool:
    """Whether a rank beats the best so far at an equal cost (``gateway.scheduling.phase._Cluster.best``): less to
    prefill, then with the decode-aware choice outliers last, requests in buckets, KV tokens; then the
    next-step level, the instance's total level, and without it running requests, KV usage, KV tokens (the unused
    places zero), then the lower index (the scan's order). ``best`` holds the best's figures in that order.
    Scalars only: array
    arguments would cost reference counting on every call."""
    if work != best[0]:
        return work < best[0]
    flag = 1.0 if out else 0.0
    if flag != best[1]:
        return flag < best[1]
    if bucketed != best[2]:
        return bucketed < best[2]
    if kv != best[3]:
        return kv < best[3]
    if next_level != best[4]:
        return next_level < best[4]
    if total_level != best[5]:
        return total_level < best[5]
    if running != best[6]:
        return running < best[6]
    if kv_usage != best[7]:
        return kv_usage < best[7]
    if kv_tokens != best[8]:
        return kv_tokens < best[8]
    return index < best_index


@_inlined
def _water_tie(
    out_i: bool,
    out_b: bool,
    first_i: float,
    first_b: float,
    second_i: float,
    second_b: float,
    third_i: float,
    third_b: float,
    position_i: int,
    position_b: int,
) -> bool:
    """Whether a rank beats the best so far at an equal level: ``(outlier, first, second, third, position)``
    lexicographically (``gateway.scheduling.allocation._Ranks.entry``: the decode-aware key, the outlier flag
    first, or :func:`~gateway.scheduling.allocation.decode_load_key`). Scalars only: array arguments would cost
    reference counting on every call."""
    if out_i != out_b:
        return out_b
    if first_i != first_b:
        return first_i < first_b
    if second_i != second_b:
        return second_i < second_b
    if third_i != third_b:
        return third_i < third_b
    return position_i < position_b


@_compiled
def water_kernel(
    level: np.ndarray,
    capacity: np.ndarray,
    open_: np.ndarray,
    position: np.ndarray,
    mask: np.ndarray,
    inst: np.ndarray,
    compensated: bool,
    decode_on: bool,
    requests: np.ndarray,
    kv: np.ndarray,
    bucket: float,
    iqr_k: float,
    g_pos: np.ndarray,
    g_start: np.ndarray,
    g_requests: np.ndarray,
    g_kv: np.ndarray,
    g_requests_sorted: np.ndarray,
    g_kv_sorted: np.ndarray,
    g_exact: np.ndarray,
    g_sums: np.ndarray,
    g_on: np.ndarray,
    tie_running: np.ndarray,
    tie_kv_usage: np.ndarray,
    tie_kv_tokens: np.ndarray,
    tokens: np.ndarray,
    young: np.ndarray,
    model: np.ndarray,
) -> np.ndarray:
    """:func:`gateway.scheduling.allocation.water_fill`'s placement loop over the usable ranks in snapshot order:
    for each request the index of its rank, ``-1`` when deferred, ``-2`` when no usable rank serves its model."""
    n = level.shape[0]
    n_inst = g_start.shape[0] - 1
    n_req = tokens.shape[0]
    choice = np.full(n_req, -1, dtype=np.int64)
    serves = np.zeros(mask.shape[0], dtype=np.bool_)
    for mm in range(mask.shape[0]):
        for i in range(n):
            if mask[mm, i]:
                serves[mm] = True
                break
    fences = np.empty((n_inst, 2))
    if decode_on:
        for e in range(n_inst):
            _fences(e, g_start, g_requests, g_kv, g_requests_sorted, g_kv_sorted, g_exact, g_sums, g_on, iqr_k,
                    bucket, compensated, fences)  # fmt: skip
    for j in range(n_req):
        mm = model[j]
        if not serves[mm]:
            choice[j] = -2
            continue
        t = float(tokens[j])
        headroom = -math.inf
        best = -1
        for i in range(n):
            if not (mask[mm, i] and open_[i]):
                continue
            if level[i] <= 0.0:
                headroom = math.inf
            elif capacity[i] - level[i] > headroom:
                headroom = capacity[i] - level[i]
            if not (level[i] + t <= capacity[i] or level[i] <= 0.0):
                continue
            if best >= 0 and level[i] > level[best]:
                continue
            if best >= 0 and level[i] == level[best]:
                if decode_on:
                    e = inst[i]
                    f = inst[best]
                    better = _water_tie(
                        requests[i] > fences[e, 0] or kv[i] > fences[e, 1],
                        requests[best] > fences[f, 0] or kv[best] > fences[f, 1],
                        requests[i] // bucket, requests[best] // bucket, kv[i], kv[best], 0.0, 0.0,
                        position[i], position[best],
                    )  # fmt: skip
                else:
                    better = _water_tie(False, False, tie_running[i], tie_running[best], tie_kv_usage[i],
                                        tie_kv_usage[best], tie_kv_tokens[i], tie_kv_tokens[best], position[i],
                                        position[best])  # fmt: skip
                if not better:
                    continue
            best = i
        if young[j] and (t > headroom or best < 0):
            continue
        if best < 0:
            for i in range(n):
                if not mask[mm, i]:
                    continue
                if best >= 0 and level[i] > level[best]:
                    continue
                if best >= 0 and level[i] == level[best]:
                    if decode_on:
                        e = inst[i]
                        f = inst[best]
                        better = _water_tie(
                            requests[i] > fences[e, 0] or kv[i] > fences[e, 1],
                            requests[best] > fences[f, 0] or kv[best] > fences[f, 1],
                            requests[i] // bucket, requests[best] // bucket, kv[i], kv[best], 0.0, 0.0,
                            position[i], position[best],
                        )  # fmt: skip
                    else:
                        better = _water_tie(False, False, tie_running[i], tie_running[best], tie_kv_usage[i],
                                            tie_kv_usage[best], tie_kv_tokens[i], tie_kv_tokens[best], position[i],
                                            position[best])  # fmt: skip
                    if not better:
                        continue
                best = i
        choice[j] = best
        level[best] += t
        if decode_on:
            _decode_place(best, inst[best], t, requests, kv, g_pos, g_start, g_requests, g_kv, g_requests_sorted,
                          g_kv_sorted, g_exact, g_sums, g_on, iqr_k, bucket, compensated, fences)  # fmt: skip
    return choice
