"""Immediate-dispatch baselines: each request is placed on a DP rank the moment it arrives.

These are the routers SBS is measured against (docs/design.md §6.3). Each policy looks at a snapshot of rank loads
(:class:`~gateway.types.RankLoad`) that already includes what the gateway itself dispatched since
the last scrape, so a burst does not herd onto one rank.

- ``round_robin``: cycle through the ranks serving the model.
- ``shortest_queue``: fewest waiting + running requests.
- ``least_tokens``: fewest outstanding tokens (prompt tokens still to prefill + KV tokens held).
- ``power_of_two``: sample two ranks at random, take the one with the shorter queue
  (Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing", 2001).
- ``random``: a uniformly random rank (seeded).
- ``vllm_internal``: vLLM's own DP load balancer as it was before 0.33, the lowest ``waiting * 4 + running``
  (``vllm/v1/engine/core_client.py``, ``DPLBAsyncMPClient``); vLLM 0.33/0.34's rule is ``vllm_dplb``
  (:mod:`.vllm_dplb`).

- ``sglang_total_tokens``: SGLang's DP controller rule ``--load-balance-method total_tokens``
  (``python/sglang/srt/managers/data_parallel_controller.py``, ``DPBudget.dispatch`` and ``update_budget``): the
  lowest ``(total tokens, total requests)`` pair, lowest rank on a full tie. A rank's total tokens are its
  ``num_total_tokens`` load report: the KV tokens in use plus the full length of every waiting request
  (``scheduler_components/load_inquirer.py``: ``num_used_tokens + sum(req.seqlen for waiting queues)``); its
  total requests are running + waiting. The chosen rank's figures grow at once by the request's tokens and one
  request (the optimistic update), until the next load report overwrites them. Here that is
  ``RankLoad.kv_tokens``, which the load view grows by each dispatched prompt at once and by every token
  generated, so it already counts waiting prompts once, and ``queue_length``; the refresh is the scrape. It
  differs from ``least_tokens`` (which also adds the queued prompt tokens, counting a waiting prompt twice) and
  breaks full ties by rank order, not by rotation.

Ties go to the rank after the one chosen last, so equal loads are spread rather than piled on rank 0.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from gateway.scheduling.baselines.base import Rotating, serving
from gateway.scheduling.baselines.indexed import Candidates, LiveRanks, LoadOrder, PerModel
from gateway.types import PendingRequest, RankKey, RankLoad


class RoundRobin(Rotating):
    name = "round_robin"

    def __init__(self) -> None:
        super().__init__()
        self._candidates = PerModel(Candidates)

    def choose(self, request: PendingRequest, ranks: Sequence[RankLoad]) -> RankKey | None:
        return self._pick(serving(request, ranks), lambda r: 0.0)

    def choose_live(self, request: PendingRequest, live: LiveRanks) -> RankKey | None:
        candidates = self._candidates.get(live, request.model)
        candidates.sync()
        n = len(candidates)
        if not n:
            return None
        start = self._next % n
        self._next = start + 1
        return candidates.load(start).key


class ShortestQueue(Rotating):
    name = "shortest_queue"

    def choose(self, request: PendingRequest, ranks: Sequence[RankLoad]) -> RankKey | None:
        return self._pick(serving(request, ranks), lambda r: r.queue_length)

    def choose_live(self, request: PendingRequest, live: LiveRanks) -> RankKey | None:
        return self._pick_live(request, live, lambda r: r.queue_length)


class LeastTokens(Rotating):
    name = "least_tokens"

    def choose(self, request: PendingRequest, ranks: Sequence[RankLoad]) -> RankKey | None:
        return self._pick(serving(request, ranks), lambda r: r.outstanding_tokens)

    def choose_live(self, request: PendingRequest, live: LiveRanks) -> RankKey | None:
        return self._pick_live(request, live, lambda r: r.outstanding_tokens)


def _total_tokens(rank: RankLoad) -> tuple[float, float]:
    """``sglang_total_tokens``'s key: total tokens, then total requests."""
    return rank.kv_tokens, rank.queue_length


class SglangTotalTokens:
    name = "sglang_total_tokens"

    def __init__(self) -> None:
        self._orders = PerModel(lambda live, model: LoadOrder(live, model, _total_tokens))

    def choose(self, request: PendingRequest, ranks: Sequence[RankLoad]) -> RankKey | None:
        candidates = serving(request, ranks)
        if not candidates:
            return None
        return min(candidates, key=_total_tokens).key

    def choose_live(self, request: PendingRequest, live: LiveRanks) -> RankKey | None:
        order = self._orders.get(live, request.model)
        candidates = order.sync()
        return candidates.load(order.order[0][1]).key if len(candidates) else None


class PowerOfTwo:
    name = "power_of_two"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self._candidates = PerModel(Candidates)

    def choose(self, request: PendingRequest, ranks: Sequence[RankLoad]) -> RankKey | None:
        candidates = serving(request, ranks)
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0].key
        a, b = self._rng.sample(candidates, 2)
        return (a if a.queue_length <= b.queue_length else b).key

    def choose_live(self, request: PendingRequest, live: LiveRanks) -> RankKey | None:
        candidates = self._candidates.get(live, request.model)
        candidates.sync()
        if not len(candidates):
            return None
        if len(candidates) == 1:
            return candidates.load(0).key
        i, j = self._rng.sample(range(len(candidates)), 2)  # the draws of a sample of the candidates themselves
        a, b = candidates.load(i), candidates.load(j)
        return (a if a.queue_length <= b.queue_length else b).key


class RandomChoice:
    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self._candidates = PerModel(Candidates)

    def choose(self, request: PendingRequest, ranks: Sequence[RankLoad]) -> RankKey | None:
        candidates = serving(request, ranks)
        return self._rng.choice(candidates).key if candidates else None

    def choose_live(self, request: PendingRequest, live: LiveRanks) -> RankKey | None:
        candidates = self._candidates.get(live, request.model)
        candidates.sync()
        return candidates.load(self._rng.choice(range(len(candidates)))).key if len(candidates) else None


class VllmInternal(Rotating):
    name = "vllm_internal"

    def choose(self, request: PendingRequest, ranks: Sequence[RankLoad]) -> RankKey | None:
        return self._pick(serving(request, ranks), lambda r: r.waiting * 4 + r.running)

    def choose_live(self, request: PendingRequest, live: LiveRanks) -> RankKey | None:
        return self._pick_live(request, live, lambda r: r.waiting * 4 + r.running)
