"""vLLM (V1 engine, 0.11 and later; checked against 0.32/0.33, the P/D gauges against 0.34).

- Rank pinning: header ``X-data-parallel-rank: <int>`` (global rank in internal-LB mode; vLLM answers 400 when
  it is out of range), see ``vllm/entrypoints/openai/api_server.py``.
- Per-rank gauges carry ``engine`` (= DP rank) and ``model_name`` labels. KV usage is
  ``vllm:kv_cache_usage_perc`` (0–1), ``vllm:gpu_cache_usage_perc`` on older servers.
- A P/D decode server (a KV consumer) keeps a request whose KV it has still to fetch among its waiting requests,
  and ``vllm:num_requests_waiting`` per ``engine`` counts it (0.34: ``num_waiting_reqs + num_skipped_waiting_reqs``,
  ``v1/metrics/loggers.py``, from ``Scheduler.get_request_counts``, ``v1/core/sched/scheduler.py``: the waiting,
  KV-holding and async-KV queues). Only a KV consumer exports ``vllm:num_requests_kv_fetch_by_stage{stage}``
  (``loggers.py``; stages ``v1/metrics/stats.py`` ``KV_FETCH_STAGES``), which splits those requests:
  ``waiting_to_start`` (set when the request arrives, ``Scheduler.add_request``: no blocks allocated yet),
  ``in_progress`` (blocks allocated, the load started) and ``completed_waiting`` (KV arrived, not running yet). The
  first two are read as :attr:`RankMetrics.decode_prealloc` and :attr:`RankMetrics.decode_transfer` and moved from
  the waiting requests to the running ones, as SGLang's decode queues are (:mod:`gateway.engines.sglang`): each
  decodes there without a prefill of its own. ``completed_waiting`` stays waiting, as SGLang's transferred requests
  waiting to join the batch do.
- Under several API servers Prometheus runs in multiprocess mode: labels come sorted and ``_created`` series
  vanish; :func:`~gateway.engines.base.read_rank_gauges` reads labels by name, so both forms parse.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from gateway.engines.base import EngineAdapter, read_rank_gauges, to_rank_metrics
from gateway.types import RankMetrics

RANK_HEADER = "X-data-parallel-rank"
RANK_LABEL = "engine"
METRIC_FIELDS = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",
    "vllm:gpu_cache_usage_perc": "kv_usage",
    'vllm:num_requests_kv_fetch_by_stage{stage="waiting_to_start"}': "decode_prealloc",
    'vllm:num_requests_kv_fetch_by_stage{stage="in_progress"}': "decode_transfer",
}
"""Sample name → :class:`RankMetrics` field; for ``kv_usage`` the current name wins over the older one."""
DECODE_QUEUE_FIELDS = ("decode_prealloc", "decode_transfer")
""":class:`RankMetrics` fields moved from ``waiting`` to ``running`` (see the module docstring)."""


class VllmAdapter(EngineAdapter):
    flavor = "vllm"

    def pin_rank(self, body: dict[str, Any], headers: MutableMapping[str, str], rank: int) -> None:
        headers[RANK_HEADER] = str(rank)

    def parse_metrics(self, text: str) -> dict[int, RankMetrics]:
        gauges = read_rank_gauges(text, METRIC_FIELDS, RANK_LABEL)
        for fields in gauges.values():
            if fetching := sum(fields.get(name, 0.0) for name in DECODE_QUEUE_FIELDS):
                fields["running"] = fields.get("running", 0.0) + fetching
                fields["waiting"] = max(0.0, fields.get("waiting", 0.0) - fetching)
        return to_rank_metrics(gauges)
