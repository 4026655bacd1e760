"""Write the Grafana dashboards under deploy/grafana/dashboards/ (JSON, provisioned by Grafana at start).

    python deploy/grafana/build_dashboards.py

The dashboards are written by this script so that every panel has the same shape and the queries live in one
readable table; edit the tables below, not the JSON (tests/deploy/test_deploy_dashboards.py fails when the JSON is
stale, and checks every metric a query names is one the gateway or a simulated engine exports).
Queries use Grafana's ``$__rate_interval``; the datasource is the provisioned Prometheus (uid ``prometheus``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
RATE = "$__rate_interval"

Panel = tuple[str, str, list[tuple[str, str]]]
"""(title, unit, [(PromQL, legend)]): one time-series panel."""


def quantiles(histogram: str, name: str = "") -> list[tuple[str, str]]:
    """p50, p90 and p99 of a Prometheus histogram (``histogram`` without ``_bucket``) over all its series;
    ``name`` starts each legend."""
    prefix = f"{name} " if name else ""
    return [
        (f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket[{RATE}])))", f"{prefix}p{int(q * 100)}")
        for q in (0.5, 0.9, 0.99)
    ]


TRAFFIC: list[tuple[str, list[Panel]]] = [
    (
        "Requests",
        [
            (
                "Request rate by status",
                "reqps",
                [(f"sum by (status) (rate(gateway_requests_total[{RATE}]))", "{{status}}")],
            ),
            (
                "Error ratio (4xx and 5xx)",
                "percentunit",
                [
                    (
                        f'(sum(rate(gateway_requests_total{{status=~"[45].."}}[{RATE}])) or vector(0))'
                        f" / sum(rate(gateway_requests_total[{RATE}]))",
                        "errors",
                    ),
                    ("gateway:requests:error_ratio_5m", "errors (5m)"),
                ],
            ),
            (
                "Rejected before an engine, by reason",
                "reqps",
                [(f"sum by (reason) (rate(gateway_rejected_requests_total[{RATE}]))", "{{reason}}")],
            ),
            (
                "Upstream failures and retries",
                "reqps",
                [
                    (f"sum by (engine, kind) (rate(gateway_upstream_failures_total[{RATE}]))", "{{engine}} {{kind}}"),
                    (f"sum by (engine) (rate(gateway_upstream_retries_total[{RATE}]))", "{{engine}} retried"),
                ],
            ),
            (
                "In flight and draining",
                "short",
                [("sum(gateway_inflight_requests)", "in flight"), ("max(gateway_draining)", "draining")],
            ),
        ],
    ),
    (
        "Latency",
        [
            ("TTFT at the gateway", "s", quantiles("gateway_ttft_seconds")),
            ("TTFT p99 by model (5m)", "s", [("gateway:ttft_seconds:p99_5m", "{{model}}")]),
            (
                "TPOT (inter-token latency, engines)",
                "s",
                quantiles("vllm:inter_token_latency_seconds", "vLLM")
                + quantiles("sglang:inter_token_latency_seconds", "SGLang"),
            ),
            ("End-to-end latency at the gateway", "s", quantiles("gateway_e2e_latency_seconds")),
        ],
    ),
    (
        "Staggered window",
        [
            ("Time buffered in the window", "s", quantiles("gateway_window_wait_seconds")),
            (
                "Requests per closed window",
                "short",
                [
                    *quantiles("gateway_window_batch_size"),
                    (
                        f"sum(rate(gateway_window_batch_size_sum[{RATE}]))"
                        f" / sum(rate(gateway_window_batch_size_count[{RATE}]))",
                        "mean",
                    ),
                ],
            ),
            (
                "Windows closed per second",
                "ops",
                [(f"sum(rate(gateway_window_batch_size_count[{RATE}]))", "windows")],
            ),
            ("Window interval", "s", [("gateway_window_interval_seconds", "{{instance}}")]),
            ("Requests buffered in the window", "short", [("gateway_window_buffered_requests", "{{instance}}")]),
        ],
    ),
    (
        "Scheduler service (front doors sharing one scheduling view)",
        [
            (
                "Front doors placing through the service (1) or alone (0)",
                "short",
                [("gateway_scheduler_service_mode", "{{instance}}")],
            ),
            (
                "Falls back to local placement, and requests the service did not place in time",
                "short",
                [
                    (
                        f"sum by (instance) (increase(gateway_scheduler_service_fallbacks_total[{RATE}]))",
                        "{{instance}} fallbacks",
                    ),
                    (
                        f"sum by (instance) (increase(gateway_scheduler_service_replaced_total[{RATE}]))",
                        "{{instance}} placed locally instead",
                    ),
                ],
            ),
        ],
    ),
]

ENGINES: list[tuple[str, list[Panel]]] = [
    (
        "Engine health",
        [
            ("Engine in rotation (circuit breaker closed)", "short", [("gateway_engine_up", "{{engine}}")]),
            (
                "Active health probes",
                "ops",
                [(f"sum by (engine, result) (rate(gateway_health_checks_total[{RATE}]))", "{{engine}} {{result}}")],
            ),
            (
                "Engine output throughput",
                "short",
                [
                    (f"sum by (engine_name) (rate(vllm:generation_tokens_total[{RATE}]))", "{{engine_name}} tok/s"),
                    (f"sum by (engine_name) (rate(sglang:generation_tokens_total[{RATE}]))", "{{engine_name}} tok/s"),
                ],
            ),
        ],
    ),
    (
        "Per-rank load and imbalance",
        [
            (
                "Requests dispatched per DP rank",
                "reqps",
                [(f"sum by (engine, rank) (rate(gateway_dispatched_requests_total[{RATE}]))", "{{engine}}/{{rank}}")],
            ),
            (
                "Prompt tokens dispatched per DP rank",
                "short",
                [
                    (
                        f"sum by (engine, rank) (rate(gateway_dispatched_prompt_tokens_total[{RATE}]))",
                        "{{engine}}/{{rank}}",
                    )
                ],
            ),
            (
                "Rank imbalance (max / mean prompt tokens, 5m)",
                "short",
                [("gateway:rank_prompt_tokens:imbalance5m", "{{engine}}")],
            ),
            (
                "Running and waiting per DP rank (gateway's load view)",
                "short",
                [
                    ("gateway_rank_running", "{{engine}}/{{rank}} running"),
                    ("gateway_rank_waiting", "{{engine}}/{{rank}} waiting"),
                ],
            ),
            (
                "Queued prefill tokens per DP rank (gateway's load view)",
                "short",
                [("gateway_rank_queued_prefill_tokens", "{{engine}}/{{rank}}")],
            ),
            (
                "KV cache usage per DP rank",
                "percentunit",
                [
                    ("gateway_rank_kv_usage", "{{engine}}/{{rank}}"),
                    ('vllm:kv_cache_usage_perc{job="engines"}', "{{engine_name}}/{{engine}} (engine)"),
                    ('sglang:token_usage{job="engines"}', "{{engine_name}}/{{dp_rank}} (engine)"),
                ],
            ),
            (
                "Engine-reported running and queued per DP rank",
                "short",
                [
                    ("vllm:num_requests_running", "{{engine_name}}/{{engine}} running"),
                    ("vllm:num_requests_waiting", "{{engine_name}}/{{engine}} waiting"),
                    ("max by (engine_name, dp_rank) (sglang:num_running_reqs)", "{{engine_name}}/{{dp_rank}} running"),
                    ("max by (engine_name, dp_rank) (sglang:num_queue_reqs)", "{{engine_name}}/{{dp_rank}} waiting"),
                ],
            ),
        ],
    ),
    (
        "Scrape health",
        [
            ("Prometheus targets up", "short", [("up", "{{job}} {{instance}}")]),
            ("Prometheus scrape duration", "s", [("scrape_duration_seconds", "{{job}} {{instance}}")]),
            (
                "Gateway scrapes of engine metrics",
                "ops",
                [(f"sum by (engine, result) (rate(gateway_scrapes_total[{RATE}]))", "{{engine}} {{result}}")],
            ),
            (
                "Gateway scrape error ratio (5m)",
                "percentunit",
                [("gateway:engine_scrape_errors:ratio5m", "{{engine}}")],
            ),
        ],
    ),
]


def by_role(series: str, role: str | None = None) -> str:
    """``series`` (a per-engine or per-rank gateway series) joined with ``gateway_engine_info`` on the engine (and the
    gateway replica): only the engines of ``role`` when given, else every engine with its ``role`` label copied."""
    if role:
        return f'{series} * on (job, instance, engine) group_left () gateway_engine_info{{role="{role}"}}'
    return f"{series} * on (job, instance, engine) group_left (role) gateway_engine_info"


def per_dp_rank(series: str) -> str:
    """An SGLang scheduler gauge, one series per DP rank (the schedulers of a rank's TP ranks may each export it)."""
    return f"max by (engine_name, dp_rank) ({series})"


PD_FAILED = 'outcome=~"prefill_failed|decode_failed"'
PD_TRIED = 'outcome=~"ok|prefill_failed|decode_failed"'

PD: list[tuple[str, list[Panel]]] = [
    (
        "P/D requests: legs and KV transfers",
        [
            (
                "P/D attempts by protocol and outcome",
                "reqps",
                [
                    (
                        f"sum by (protocol, outcome) (rate(gateway_pd_transfers_total[{RATE}]))",
                        "{{protocol}} {{outcome}}",
                    )
                ],
            ),
            (
                "Failed attempts (a leg or the KV transfer failed) / attempts",
                "percentunit",
                [
                    (
                        f"(sum by (protocol) (rate(gateway_pd_transfers_total{{{PD_FAILED}}}[{RATE}]))"
                        f' or 0 * sum by (protocol) (rate(gateway_pd_transfers_total{{outcome="ok"}}[{RATE}])))'
                        f" / sum by (protocol) (rate(gateway_pd_transfers_total{{{PD_TRIED}}}[{RATE}]))",
                        "{{protocol}}",
                    ),
                    ("gateway:pd_transfers:failure_ratio5m", "{{protocol}} (5m)"),
                ],
            ),
            (
                "Failed legs by engine, leg and kind",
                "reqps",
                [
                    (
                        f"sum by (engine, leg, kind) (rate(gateway_pd_leg_failures_total[{RATE}]))",
                        "{{engine}} {{leg}} {{kind}}",
                    )
                ],
            ),
            (
                "Retries after a failure, by the failed engine's role",
                "reqps",
                [(f"sum by (role) ({by_role(f'rate(gateway_upstream_retries_total[{RATE}])')})", "{{role}}")],
            ),
        ],
    ),
    (
        "Load by role (gateway's load view)",
        [
            (
                "Running and waiting requests per pool",
                "short",
                [
                    (f"sum by (role) ({by_role('gateway_rank_running')})", "{{role}} running"),
                    (f"sum by (role) ({by_role('gateway_rank_waiting')})", "{{role}} waiting"),
                ],
            ),
            (
                "Prefill ranks: queued prefill tokens",
                "short",
                [(by_role("gateway_rank_queued_prefill_tokens", "prefill"), "{{engine}}/{{rank}}")],
            ),
            (
                "Decode ranks: KV cache usage",
                "percentunit",
                [
                    (by_role("gateway_rank_kv_usage", "decode"), "{{engine}}/{{rank}}"),
                    ("gateway:decode_rank_kv_usage:avg", "{{engine}} mean"),
                ],
            ),
            (
                "Decode ranks: running requests",
                "short",
                [(by_role("gateway_rank_running", "decode"), "{{engine}}/{{rank}}")],
            ),
        ],
    ),
    (
        "P/D queues inside the engines",
        [
            (
                "Prefill: waiting for the decode side, holding KV for it (SGLang)",
                "short",
                [
                    (
                        per_dp_rank('sglang:num_prefill_bootstrap_queue_reqs{engine_type="prefill"}'),
                        "{{engine_name}}/{{dp_rank}} bootstrap",
                    ),
                    (
                        per_dp_rank('sglang:num_prefill_inflight_queue_reqs{engine_type="prefill"}'),
                        "{{engine_name}}/{{dp_rank}} inflight",
                    ),
                ],
            ),
            (
                "Decode: requests waiting for their KV",
                "short",
                [
                    (
                        per_dp_rank('sglang:num_decode_prealloc_queue_reqs{engine_type="decode"}'),
                        "{{engine_name}}/{{dp_rank}} prealloc",
                    ),
                    (
                        per_dp_rank('sglang:num_decode_transfer_queue_reqs{engine_type="decode"}'),
                        "{{engine_name}}/{{dp_rank}} transfer",
                    ),
                    (
                        'vllm:num_requests_kv_fetch_by_stage{stage!="completed_waiting"}',
                        "{{engine_name}}/{{engine}} {{stage}}",
                    ),
                ],
            ),
            (
                "Decode engines' KV cache usage (engine-reported)",
                "percentunit",
                [
                    ('sglang:token_usage{engine_type="decode"}', "{{engine_name}}/{{dp_rank}}"),
                    ('vllm:kv_cache_usage_perc{role="decode"}', "{{engine_name}}/{{engine}}"),
                ],
            ),
        ],
    ),
]
"""The P/D dashboard. Gateway series are read by role through ``gateway_engine_info``; engine series by SGLang's
``engine_type`` label or the ``role`` label of the engine's scrape target (deploy/prometheus/prometheus-pd.yml)."""


def dashboard(uid: str, title: str, rows: list[tuple[str, list[Panel]]]) -> dict[str, Any]:
    """A Grafana dashboard (schema 39) of collapsed-open rows of 12-wide time-series panels."""
    panels: list[dict[str, Any]] = []
    y = 0
    for row_title, row_panels in rows:
        panels.append(
            {
                "id": len(panels) + 1,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        y += 1
        for i, (panel_title, unit, queries) in enumerate(row_panels):
            panels.append(
                {
                    "id": len(panels) + 1,
                    "type": "timeseries",
                    "title": panel_title,
                    "datasource": DATASOURCE,
                    "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": y + 8 * (i // 2)},
                    "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                    "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
                    "targets": [
                        {"refId": chr(ord("A") + n), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
                        for n, (expr, legend) in enumerate(queries)
                    ],
                }
            )
        y += 8 * ((len(row_panels) + 1) // 2)
    return {
        "uid": uid,
        "title": title,
        "tags": ["sbs-gateway"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": []},
        "annotations": {"list": []},
        "links": [{"type": "dashboards", "tags": ["sbs-gateway"], "asDropdown": False, "title": "SBS gateway"}],
        "panels": panels,
    }


DASHBOARDS = {
    "sbs-gateway-traffic.json": dashboard("sbs-gateway-traffic", "SBS gateway: traffic and latency", TRAFFIC),
    "sbs-gateway-engines.json": dashboard("sbs-gateway-engines", "SBS gateway: engines", ENGINES),
    "sbs-gateway-pd.json": dashboard("sbs-gateway-pd", "SBS gateway: P/D disaggregation", PD),
}


def render(name: str) -> str:
    """The JSON text of dashboard file ``name``."""
    return json.dumps(DASHBOARDS[name], indent=2) + "\n"


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name in DASHBOARDS:
        (OUT / name).write_text(render(name), encoding="utf-8")
        print(f"wrote {OUT / name}")


if __name__ == "__main__":
    main()
