"""``vllm_dplb``: vLLM 0.34's internal DP load balancer (the successor of ``vllm_internal``'s rule).

Source: vLLM 0.34 (unchanged from 0.33), ``vllm/v1/engine/core_client.py``, ``DPLBAsyncMPClient
.get_core_engine_for_request``. For each engine (one per DP rank), scanning from a start index:

    score = max(client_count * inflight, waiting + running) + waiting * 6 * max(0, kv_usage - 0.5)

(the last term only when ``waiting`` > 0); the first strictly lowest score wins, the chosen engine's local
``waiting`` grows by ``client_count`` until the coordinator's next stats (every ~100 ms), and the scan start
moves on by one after every pick, so equal scores go round robin. Here, with one gateway (``client_count`` 1):
``waiting`` and ``running`` are the load view's, which already count the gateway's own dispatches since the
scrape and never fall below its own in-flight requests, so they stand for both the snapshot with its local
increments and the in-flight floor; ``kv_usage`` is the scraped usage, 0 when not reported.

The older rule, ``waiting * 4 + running``, stays as ``vllm_internal`` (:mod:`.policies`).
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.scheduling.baselines.base import serving
from gateway.scheduling.baselines.indexed import LiveRanks, LoadOrder, PerModel, first_lowest_from
from gateway.types import PendingRequest, RankKey, RankLoad

KV_WAITING_PENALTY = 6.0
"""Slope of the waiting-queue penalty per unit of KV usage above :data:`KV_PENALTY_KNEE` (``core_client.py``)."""

KV_PENALTY_KNEE = 0.5
"""KV usage below which waiting requests carry no penalty (``core_client.py``)."""


def vllm_dplb_score(rank: RankLoad) -> float:
    """vLLM 0.34's score of one rank (module docstring), requests."""
    score = rank.waiting + rank.running
    if rank.waiting:
        score += rank.waiting * KV_WAITING_PENALTY * max(0.0, (rank.kv_usage or 0.0) - KV_PENALTY_KNEE)
    return score


class VllmDplb:
    name = "vllm_dplb"

    def __init__(self) -> None:
        self._start = 0
        self._orders = PerModel(lambda live, model: LoadOrder(live, model, vllm_dplb_score))

    def choose(self, request: PendingRequest, ranks: Sequence[RankLoad]) -> RankKey | None:
        candidates = serving(request, ranks)
        if not candidates:
            return None
        n = len(candidates)
        start = self._start % n
        order = candidates[start:] + candidates[:start]
        self._start = start + 1
        return min(order, key=vllm_dplb_score).key

    def choose_live(self, request: PendingRequest, live: LiveRanks) -> RankKey | None:
        order = self._orders.get(live, request.model)
        candidates = order.sync()
        n = len(candidates)
        if not n:
            return None
        start = self._start % n
        self._start = start + 1
        return candidates.load(first_lowest_from(order.order, start)).key
