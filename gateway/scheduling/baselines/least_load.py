"""``least_load``: the SGLang Model Gateway's least-work policy, per DP rank.

Source: smg 1.13.0 (the PyPI source distribution), ``model_gateway/src/policies/least_load.rs``
(``LeastLoadPolicy::score``, ``queued_tokens``, ``running_estimated_tokens``, ``unaccounted_requests``) and
``model_gateway/src/worker/expected_wait.rs``; defaults from ``bindings/python/src/smg/router_args.py``
(``least_load_*``). With ``--dp-aware`` a worker is a DP rank. The rank with the lowest expected wait

    score = (queued_tokens + running * p + unaccounted * p + inflight_tokens) / throughput
            + kv_pressure_weight * k / (1 - k)

seconds wins; scores within 1 µs of the lowest are a tie, drawn uniformly (seeded). What smg reads, and what
stands in for it here:

- ``queued_tokens + inflight_tokens``: the engine's ``num_waiting_uncached_tokens`` at its last poll plus the
  prompt tokens smg dispatched to it since (its since-poll tally, released by the next report). Here
  ``RankLoad.queued_prefill_tokens``, the load view's prompt tokens dispatched and not yet prefilled: the same
  tally kept continuously. smg counts a dispatch's exact tokens on its gRPC path and ``p`` on HTTP, where it has
  no token count; here the gateway's estimate, as on gRPC.
- ``running * p``: the running requests at ``mean_prefill_tokens`` (``p``, 1,024) each; ``RankLoad.running``.
- ``unaccounted``: requests the router holds that neither the report nor the tally covers (in transit); 0 here,
  as the load view's counts never fall below the gateway's own in-flight requests.
- ``throughput``: the reported ``gen_throughput``, else ``default_throughput`` (2,000 tokens/s). The load view
  does not measure a generation rate per rank, so the default stands in for every rank.
- ``k``: the KV usage, clamped to [0, 0.999]; ``RankLoad.kv_usage``, 0 when not reported.

smg's optional waiting-queue veto (``--least-load-max-waiting-requests``) is off by default and not modelled.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from gateway.scheduling.baselines.base import serving
from gateway.scheduling.baselines.indexed import LiveRanks, LoadOrder, PerModel
from gateway.types import PendingRequest, RankKey, RankLoad

KV_PRESSURE_WEIGHT_S = 0.15
"""``λ``, seconds (``DEFAULT_KV_PRESSURE_WEIGHT``, ``expected_wait.rs``; ``--least-load-kv-pressure-weight``)."""

DEFAULT_THROUGHPUT = 2000.0
"""Drain rate when none is reported, tokens/s (``DEFAULT_THROUGHPUT``; ``--least-load-default-throughput``)."""

MEAN_PREFILL_TOKENS = 1024
"""``p``, tokens per request of unknown size (``DEFAULT_MEAN_PREFILL_TOKENS``; ``--least-load-mean-prefill-tokens``)."""

TIE_S = 1e-6
"""Scores within this of the lowest are one tie, seconds (``TIE_EPSILON_SECS``, ``least_load.rs``)."""


def least_load_score(rank: RankLoad) -> float:
    """smg's expected wait on one rank, seconds (module docstring)."""
    k = min(max(rank.kv_usage or 0.0, 0.0), 0.999)
    work = rank.queued_prefill_tokens + rank.running * MEAN_PREFILL_TOKENS
    return work / DEFAULT_THROUGHPUT + KV_PRESSURE_WEIGHT_S * k / (1.0 - k)


def least_expected_wait(candidates: Sequence[RankLoad], rng: random.Random) -> RankLoad:
    """The candidate with the lowest :func:`least_load_score`, ties within :data:`TIE_S` drawn uniformly.

    Raises:
        ValueError: no candidates.
    """
    scores = [least_load_score(r) for r in candidates]
    low = min(scores)
    return rng.choice([r for r, s in zip(candidates, scores, strict=True) if s - low <= TIE_S])


def least_wait_tie(
    order: list[tuple[float, int]], rng: random.Random, allowed: Callable[[int], bool] | None = None
) -> int | None:
    """smg's least expected wait over an order of :func:`least_load_score`
    (of the candidates ``allowed`` accepts, all when ``None``): one of the candidates within :data:`TIE_S` of the
    lowest, drawn as ``rng.choice`` draws from them in candidate order; ``None`` when none is allowed.

    Without ``allowed`` the tie is found by binary search (the scores within :data:`TIE_S` of the lowest are a
    prefix of the order) and, when its scores are all equal, is in candidate order already: O(log candidates).
    With ``allowed`` the order is walked until the tie ends."""
    if allowed is None:
        low = order[0][0]
        lo, hi = 1, len(order)
        while lo < hi:
            mid = (lo + hi) // 2
            if order[mid][0] - low <= TIE_S:
                lo = mid + 1
            else:
                hi = mid
        if order[lo - 1][0] == low:
            return order[rng.choice(range(lo))][1]
        return rng.choice(sorted(j for _, j in order[:lo]))
    first: float | None = None
    tie: list[int] = []
    for score, j in order:
        if first is not None and score - first > TIE_S:
            break
        if allowed(j):
            if first is None:
                first = score
            tie.append(j)
    if first is None:
        return None
    tie.sort()
    return rng.choice(tie)


class LeastLoad:
    name = "least_load"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self._orders = PerModel(lambda live, model: LoadOrder(live, model, least_load_score))

    def choose(self, request: PendingRequest, ranks: Sequence[RankLoad]) -> RankKey | None:
        candidates = serving(request, ranks)
        return least_expected_wait(candidates, self._rng).key if candidates else None

    def choose_live(self, request: PendingRequest, live: LiveRanks) -> RankKey | None:
        order = self._orders.get(live, request.model)
        candidates = order.sync()
        if not candidates:
            return None
        j = least_wait_tie(order.order, self._rng)
        assert j is not None
        return candidates.load(j).key
