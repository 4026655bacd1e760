"""vLLM (V1 engine, 0.11 and later; checked against 0.32/0.33).

- Rank pinning: header ``X-data-parallel-rank: <int>`` (global rank in internal-LB mode; vLLM answers 400 when
  it is out of range), see ``vllm/entrypoints/openai/api_server.py``.
- Per-rank gauges carry ``engine`` (= DP rank) and ``model_name`` labels. KV usage is
  ``vllm:kv_cache_usage_perc`` (0–1), ``vllm:gpu_cache_usage_perc`` on older servers.
- A P/D decode server (a KV consumer) parks a request whose KV it is still fetching (status
  ``WAITING_FOR_REMOTE_KVS``) in the scheduler's ``skipped_waiting`` queue, and ``vllm:num_requests_waiting`` per
  ``engine`` is ``num_waiting_reqs + num_skipped_waiting_reqs`` (``v1/core/sched/scheduler.py``,
  ``v1/metrics/loggers.py``), so the gauge counts it; the
  consumer-only ``vllm:num_requests_kv_fetch_by_stage{stage}`` splits those requests by fetch stage and is not
  read (adding it would count them twice).
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
}
"""Sample name → :class:`RankMetrics` field; for ``kv_usage`` the current name wins over the older one."""


class VllmAdapter(EngineAdapter):
    flavor = "vllm"

    def pin_rank(self, body: dict[str, Any], headers: MutableMapping[str, str], rank: int) -> None:
        headers[RANK_HEADER] = str(rank)

    def parse_metrics(self, text: str) -> dict[int, RankMetrics]:
        return to_rank_metrics(read_rank_gauges(text, METRIC_FIELDS, RANK_LABEL))
