"""SGLang (checked against 0.5.x with DP attention; rank labels since mid-2025).

- Rank pinning: body field ``routed_dp_rank`` on ``/v1/chat/completions``, ``/v1/completions`` and
  ``/generate``; the older name ``data_parallel_rank`` is still accepted by SGLang but is removed here so the
  two cannot disagree.
- Scheduler gauges (``--enable-metrics``, always multiprocess mode) carry ``model_name``, ``engine_type``,
  ``tp_rank``, ``pp_rank``, ``moe_ep_rank`` and, under DP attention, ``dp_rank``. Several TP ranks of one DP rank
  may each export a series: they are de-duplicated.
- A P/D decode server (``engine_type="decode"`` on its gauges) keeps requests whose KV is being allocated or
  transferred in two queues apart from its running batch, exported per DP rank as
  ``sglang:num_decode_prealloc_queue_reqs`` and ``sglang:num_decode_transfer_queue_reqs`` (0.5.23
  ``observability/metrics_collector.py``; the lengths of the scheduler's ``disagg_decode_prealloc_queue`` and
  ``disagg_decode_transfer_queue``; the same figures are ``disaggregation.decode_prealloc_queue_reqs`` and
  ``decode_transfer_queue_reqs`` of ``GET /v1/loads?include=disagg``, not read here). They are added to the
  rank's running requests: each will decode without a prefill of its own, and the gateway counts its decode legs
  as running from dispatch (:meth:`gateway.load.view.LoadView.on_dispatch_decode`). Other servers export them as
  0 or not at all.
- ``GET /v1/loads?include=core`` (0.5.x; ``sglang/srt/entrypoints/v1_loads.py``) answers ``{"loads": [...]}``, one
  entry per DP rank with ``dp_rank`` and ``num_waiting_uncached_tokens``: the waiting queue's prompt tokens not
  matched in the prefix cache plus what the request being chunk-prefilled has left
  (``SchedulerLoadInquirer.get_num_waiting_uncached_tokens``, ``managers/scheduler_components/load_inquirer.py``),
  read by :meth:`SglangAdapter.parse_loads` into :attr:`RankMetrics.queued_prefill_tokens`.
- ``GET /get_server_info`` answers the server arguments as a JSON object (``dataclasses.asdict(ServerArgs)`` plus
  internal state); ``enable_prefill_delayer`` (0.5.x, ``--enable-prefill-delayer``) says whether the scheduler holds
  new prefill until its DP ranks line up, read by :meth:`SglangAdapter.prefill_alignment_from_server_info`.
- Non-streaming errors are flat ``{"object": "error", "message", "type", "param", "code"}``, read by
  :meth:`SglangAdapter.normalize_error`.
"""

from __future__ import annotations

import json
import math
from collections.abc import MutableMapping
from typing import Any, ClassVar

from gateway.engines.base import EngineAdapter, MetricsParseError, read_rank_gauges, to_rank_metrics
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
    "sglang:num_decode_prealloc_queue_reqs": "decode_prealloc",
    "sglang:num_decode_transfer_queue_reqs": "decode_transfer",
}
DECODE_QUEUE_FIELDS = ("decode_prealloc", "decode_transfer")
"""Fields of :data:`METRIC_FIELDS` added to ``running`` (see the module docstring)."""


LOADS_QUEUED_FIELD = "num_waiting_uncached_tokens"


class SglangAdapter(EngineAdapter):
    flavor = "sglang"
    loads_path: ClassVar[str] = "/v1/loads?include=core"
    """Per-rank load as JSON; only the core fields are asked for."""
    server_info_path: ClassVar[str | None] = "/get_server_info"

    def prefill_alignment_from_server_info(self, text: str) -> bool | None:
        """``enable_prefill_delayer`` from a ``/get_server_info`` body; ``None`` when the body is not a JSON
        object or the field is missing or not a boolean (an SGLang without the PrefillDelayer)."""
        try:
            body = json.loads(text)
        except ValueError:
            return None
        value = body.get("enable_prefill_delayer") if isinstance(body, dict) else None
        return value if isinstance(value, bool) else None

    def pin_rank(self, body: dict[str, Any], headers: MutableMapping[str, str], rank: int) -> None:
        for legacy in LEGACY_RANK_FIELDS:
            body.pop(legacy, None)
        body[RANK_FIELD] = rank

    def parse_metrics(self, text: str) -> dict[int, RankMetrics]:
        gauges = read_rank_gauges(text, METRIC_FIELDS, RANK_LABEL)
        for fields in gauges.values():
            queued = sum(fields.pop(name, 0.0) for name in DECODE_QUEUE_FIELDS)
            if queued:
                fields["running"] = fields.get("running", 0.0) + queued
        return to_rank_metrics(gauges)

    def parse_loads(self, text: str) -> dict[int, float]:
        """``{dp_rank: num_waiting_uncached_tokens}`` from a ``GET /v1/loads`` body. Entries whose rank is not an
        integer >= 0, or whose figure is missing or not a finite number >= 0, are skipped.

        Raises:
            MetricsParseError: the body is not JSON with a ``loads`` list.
        """
        try:
            body = json.loads(text)
        except ValueError as exc:
            raise MetricsParseError(f"invalid /v1/loads body: {exc}") from exc
        loads = body.get("loads") if isinstance(body, dict) else None
        if not isinstance(loads, list):
            raise MetricsParseError("invalid /v1/loads body: no 'loads' list")
        out: dict[int, float] = {}
        for load in loads:
            if not isinstance(load, dict):
                continue
            rank, value = load.get("dp_rank"), load.get(LOADS_QUEUED_FIELD)
            if type(rank) is not int or rank < 0 or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value) and value >= 0:
                out[rank] = float(value)
        return out

    def normalize_error(self, status: int, raw: bytes) -> dict[str, Any]:
        parsed = json_object(raw)
        if parsed is not None and openai_error_fields(parsed) is None and "message" in parsed:
            return engine_error_body(status, parsed)  # the flat shape
        return super().normalize_error(status, raw)
