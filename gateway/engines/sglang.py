"""SGLang (checked against 0.5.x with DP attention; rank labels since mid-2025).

- Rank pinning: body field ``routed_dp_rank`` on ``/v1/chat/completions``, ``/v1/completions`` and
  ``/generate``; the older name ``data_parallel_rank`` is still accepted by SGLang but is removed here so the
  two cannot disagree.
- Scheduler gauges (``--enable-metrics``, always multiprocess mode) carry ``model_name``, ``engine_type``,
  ``tp_rank``, ``pp_rank``, ``moe_ep_rank`` and, under DP attention, ``dp_rank``. Several TP ranks of one DP rank
  may each export a series: they are de-duplicated.
- A P/D server labels its scheduler gauges ``engine_type="prefill"`` or ``"decode"`` and exports its queues per DP
  rank (0.5.23 ``observability/metrics_collector.py`` ``SchedulerMetricsCollector``; the lengths of the scheduler's
  queues, ``scheduler_components/metrics_reporter.py``): a decode server ``sglang:num_decode_prealloc_queue_reqs``
  (requests waiting for their KV to be reserved) and ``sglang:num_decode_transfer_queue_reqs`` (KV reserved, being
  received), a prefill server ``sglang:num_prefill_bootstrap_queue_reqs`` (waiting for the decode side before
  their prefill) and ``sglang:num_prefill_inflight_queue_reqs`` (prefilled, KV kept until the decode side has it).
  ``sglang:num_queue_reqs`` counts neither (the scheduler's ``waiting_queue`` only), so the decode queues are added
  to the rank's running requests (each will decode there without a prefill of its own; the gateway counts its
  decode legs as running from dispatch, :meth:`gateway.load.view.LoadView.on_dispatch_decode`) and the bootstrap
  queue to its waiting ones, as SGLang's own ``/v1/loads`` counts them in ``num_waiting_reqs``. Servers that are
  not P/D export them as 0; with priority scheduling each has per-``priority`` series beside the total, and the
  largest per rank, the total, is kept.
- ``GET /v1/loads?include=core,disagg`` (0.5.23 ``entrypoints/v1_loads.py``) answers ``{"loads": [...]}``, one
  entry per DP rank (``LoadSnapshot.to_dict``, ``managers/load_snapshot.py``): every scalar field of the rank's
  snapshot, ``num_waiting_uncached_tokens`` among them (the waiting queue's prompt tokens not matched in the prefix
  cache plus what the request being chunk-prefilled has left, ``SchedulerLoadInquirer.get_num_waiting_uncached_tokens``,
  ``managers/scheduler_components/load_inquirer.py``), and the ``disaggregation`` section: ``mode``
  (``prefill``|``decode``|``null``), ``prefill_bootstrap_queue_reqs``, ``prefill_inflight_queue_reqs``,
  ``decode_prealloc_queue_reqs``, ``decode_transfer_queue_reqs``, ``decode_retracted_queue_reqs``. The snapshot is
  rebuilt at each scheduler pass, while the ``/metrics`` gauges move at the scheduler's logging interval, so for a
  P/D rank :meth:`SglangAdapter.parse_loads` gives the whole load from it (``SchedulerLoadInquirer.get_loads``): on
  a decode rank ``num_waiting_reqs`` counts the waiting queue and the pre-allocation, transfer and retracted
  queues, ``num_total_tokens`` the KV in use (transfer reservations included) plus the tokens of the
  pre-allocation and retracted queues (``num_active_tokens`` is that less the tokens whose KV has not arrived, so
  it leaves out exactly the reservations a decode placement must count: not read); on a prefill rank
  ``num_waiting_reqs`` counts the bootstrap queue too.
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
    "sglang:num_prefill_bootstrap_queue_reqs": "prefill_bootstrap",
    "sglang:num_prefill_inflight_queue_reqs": "prefill_inflight",
}
DECODE_QUEUE_FIELDS = ("decode_prealloc", "decode_transfer", "decode_retracted")
""":class:`RankMetrics` fields counted in ``running`` (see the module docstring)."""
PREFILL_QUEUE_FIELDS = ("prefill_bootstrap",)
""":class:`RankMetrics` fields counted in ``waiting``."""

LOADS_QUEUED_FIELD = "num_waiting_uncached_tokens"
LOADS_DISAGG_FIELDS = {
    "decode_prealloc_queue_reqs": "decode_prealloc",
    "decode_transfer_queue_reqs": "decode_transfer",
    "decode_retracted_queue_reqs": "decode_retracted",
    "prefill_bootstrap_queue_reqs": "prefill_bootstrap",
    "prefill_inflight_queue_reqs": "prefill_inflight",
}
"""``/v1/loads`` ``disaggregation`` keys → :class:`RankMetrics` fields."""


def _count(value: object) -> float | None:
    """``value`` as a finite number >= 0, or ``None`` (missing, a boolean, not a number, negative, not finite)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


class SglangAdapter(EngineAdapter):
    flavor = "sglang"
    loads_path: ClassVar[str] = "/v1/loads?include=core,disagg"
    """Per-rank load as JSON: the core fields and the P/D queues."""
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
            if queued := sum(fields.get(name, 0.0) for name in DECODE_QUEUE_FIELDS):
                fields["running"] = fields.get("running", 0.0) + queued
            if queued := sum(fields.get(name, 0.0) for name in PREFILL_QUEUE_FIELDS):
                fields["waiting"] = fields.get("waiting", 0.0) + queued
        return to_rank_metrics(gauges)

    def parse_loads(self, text: str) -> dict[int, dict[str, float]]:
        """Per-rank :class:`RankMetrics` fields from a ``GET /v1/loads`` body: ``queued_prefill_tokens``
        (``num_waiting_uncached_tokens``) for every rank, and for a rank whose ``disaggregation.mode`` is
        ``prefill`` or ``decode`` its whole load (``running``, ``waiting``, its queues and, on decode,
        ``kv_tokens``), counted as :meth:`parse_metrics` counts them (see the module docstring). Entries whose rank
        is not an integer >= 0 are skipped, and so are figures missing or not a finite number >= 0; a P/D entry
        without its request counts gives only its queued tokens.

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
        out: dict[int, dict[str, float]] = {}
        for load in loads:
            if not isinstance(load, dict):
                continue
            rank = load.get("dp_rank")
            if type(rank) is not int or rank < 0:
                continue
            fields: dict[str, float] = {}
            if (queued := _count(load.get(LOADS_QUEUED_FIELD))) is not None:
                fields["queued_prefill_tokens"] = queued
            fields |= _pd_load(load)
            if fields:
                out[rank] = fields
        return out

    def normalize_error(self, status: int, raw: bytes) -> dict[str, Any]:
        parsed = json_object(raw)
        if parsed is not None and openai_error_fields(parsed) is None and "message" in parsed:
            return engine_error_body(status, parsed)  # the flat shape
        return super().normalize_error(status, raw)


def _pd_load(load: dict[str, Any]) -> dict[str, float]:
    """The load of a P/D rank from its ``/v1/loads`` entry (see :meth:`SglangAdapter.parse_loads`); ``{}`` for a
    rank that is not P/D or whose figures are unreadable."""
    disagg = load.get("disaggregation")
    running, waiting = _count(load.get("num_running_reqs")), _count(load.get("num_waiting_reqs"))
    if not isinstance(disagg, dict) or disagg.get("mode") not in ("prefill", "decode"):
        return {}
    if running is None or waiting is None:
        return {}
    fields = {
        field: value for key, field in LOADS_DISAGG_FIELDS.items() if (value := _count(disagg.get(key))) is not None
    }
    if disagg["mode"] == "decode":
        queued = sum(fields.get(name, 0.0) for name in DECODE_QUEUE_FIELDS)
        running, waiting = running + queued, max(0.0, waiting - queued)
        if (kv_tokens := _count(load.get("num_total_tokens"))) is not None:
            fields["kv_tokens"] = kv_tokens
    return {**fields, "running": running, "waiting": waiting}
