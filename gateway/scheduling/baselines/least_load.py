"""``least_load``: the SGLang Model Gateway's least-work policy, per DP rank.

Source: smg-project/smg @f8daa88, ``model_gateway/src/policies/least_load.rs`` (``LeastLoadPolicy``); defaults
from ``bindings/python/src/smg/router_args.py`` (``least_load_*``, the same in the smg 1.13 wheel). The rank
with the lowest

    score = (queued_tokens + inflight_tokens) / throughput + kv_pressure_weight * k / (1 - k)

seconds, first lowest on a tie (smg scans its workers in order and keeps a strictly lower score). What smg reads,
and what stands in for it here:

- ``queued_tokens + inflight_tokens``: the engine's ``num_waiting_uncached_tokens`` at its last poll plus the
  prompt tokens smg dispatched since (its since-poll tally). Here: ``RankLoad.queued_prefill_tokens``, the load
  view's prompt tokens dispatched and not yet prefilled, which is that tally kept continuously (it also drops a
  request at its first token, where smg waits for the next poll, ``load_monitor_interval`` 10 s).
- ``throughput``: the rank's reported ``gen_throughput``, else ``default_throughput`` (2,000 tokens/s). The load
  view does not measure a generation rate per rank, so the default stands in for every rank (on equal ranks it
  only sets how the work term weighs against the KV barrier).
- ``k``: the KV usage (``token_usage``), clamped to [0, 0.999]; ``RankLoad.kv_usage``, 0 when not reported.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.scheduling.baselines.base import serving
from gateway.types import PendingRequest, RankKey, RankLoad

KV_PRESSURE_WEIGHT_S = 0.15
"""``λ``, seconds (``DEFAULT_KV_PRESSURE_WEIGHT`` in ``least_load.rs``; ``--least-load-kv-pressure-weight``)."""

DEFAULT_THROUGHPUT = 2000.0
"""Drain rate when no rate is reported, tokens/s (``DEFAULT_THROUGHPUT``; ``--least-load-default-throughput``)."""


def least_load_score(rank: RankLoad, throughput: float = DEFAULT_THROUGHPUT) -> float:
    """smg's expected-wait score of one rank, seconds (module docstring)."""
    k = min(max(rank.kv_usage or 0.0, 0.0), 0.999)
    return rank.queued_prefill_tokens / throughput + KV_PRESSURE_WEIGHT_S * k / (1.0 - k)


class LeastLoad:
    name = "least_load"

    def choose(self, request: PendingRequest, ranks: Sequence[RankLoad]) -> RankKey | None:
        candidates = serving(request, ranks)
        return min(candidates, key=least_load_score).key if candidates else None
