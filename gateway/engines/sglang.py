"""SGLang (checked against 0.5.x with DP attention; rank labels since mid-2025).

- Rank pinning: body field ``routed_dp_rank`` on ``/v1/chat/completions``, ``/v1/completions`` and
  ``/generate``; the older name ``data_parallel_rank`` is still accepted by SGLang but is removed here so the
  two cannot disagree.
- Scheduler gauges (``--enable-metrics``, always multiprocess mode) carry ``model_name``, ``engine_type``,
  ``tp_rank``, ``pp_rank``, ``moe_ep_rank`` and, under DP attention, ``dp_rank``. Several TP ranks of one DP rank
  may each export a series: they are de-duplicated.
- Non-streaming errors are flat ``{"object": "error", "message", "type", "param", "code"}``, read by
  :meth:`SglangAdapter.normalize_error`.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from gateway.engines.base import EngineAdapter, read_rank_gauges, to_rank_metrics
from gateway.errors import engine_error_body, json_object, openai_error_fields
from gateway.types import RankMetrics

RANK_FIELD = "routed_dp_rank"
LEGACY_RANK_FIELDS = ("data_parallel_rank",)
RANK_LABEL = "dp_rank"
METRIC_FIELDS = {
    "sglang:num_running_reqs": "running",
    "sglang:num_queue_reqs": "waiting",
    "sglang:token_usage": "kv_usage",
    "sglang:num_used_tokens": "kv_used_tokens",
    "sglang:max_total_num_tokens": "kv_capacity_tokens",
}


class SglangAdapter(EngineAdapter):
    flavor = "sglang"

    def pin_rank(self, body: dict[str, Any], headers: MutableMapping[str, str], rank: int) -> None:
        for legacy in LEGACY_RANK_FIELDS:
            body.pop(legacy, None)
        body[RANK_FIELD] = rank

    def parse_metrics(self, text: str) -> dict[int, RankMetrics]:
        return to_rank_metrics(read_rank_gauges(text, METRIC_FIELDS, RANK_LABEL))

    def normalize_error(self, status: int, raw: bytes) -> dict[str, Any]:
        parsed = json_object(raw)
        if parsed is not None and openai_error_fields(parsed) is None and "message" in parsed:
            return engine_error_body(status, parsed)  # the flat shape
        return super().normalize_error(status, raw)
