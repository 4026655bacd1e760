"""Write the Grafana dashboards under deploy/grafana/dashboards/ (JSON, provisioned by Grafana at start) with
Grafana's own builders, ``grafana-foundation-sdk`` (the ``dev`` extra; its build for the stack's Grafana 11.2,
dashboard schema 39).

    python deploy/grafana/build_dashboards.py           # write the JSON files
    python deploy/grafana/build_dashboards.py --check   # exit 1 if a file is not what this script writes

Edit the tables below, not the JSON: tests/deploy/test_deploy_dashboards.py fails when the JSON is stale, and checks
that every metric a query names is one the gateway, a simulated engine or a recording rule exports.
Queries use Grafana's ``$__rate_interval``; the datasource is the provisioned Prometheus (uid ``prometheus``).

Adding a panel
--------------
A dashboard is a table of groups (a Grafana row each); a group is a title and a list of :class:`Graph` (a
time-series panel: title, unit, queries). Panels are laid out two to a line, 12 columns by 8 rows each. To add one,
add a line to a group, or a group to a dashboard's table::

    Graph("TTFT by priority class", "s", quantiles("gateway_ttft_seconds", by=("priority",))),
    Graph("Rate-limited requests", "reqps", [rate_by("gateway_rate_limited_total", "tenant", "limit")]),
    Graph("Engines draining", "short", [Query("gateway_engine_draining", "{{engine}}")]),

then run this script and commit the JSON. The helpers write the usual queries: :func:`rate_by` (a counter's rate
summed by labels, the legend naming them), :func:`quantiles` (p50/p90/p99 of a histogram, per label values with
``by``), :func:`by_role` and :func:`per_dp_rank` (P/D joins); anything else is a :class:`Query` with its PromQL
and legend. The unit is Grafana's unit id (``s``, ``reqps``, ``ops``, ``percentunit``, ``short``). A query naming a
series no one exports fails the test: add the metric to the gateway first. A new dashboard is one line in
:data:`DASHBOARDS`; another panel kind (a stat, thresholds) is one function beside :func:`timeseries` using the SDK's
builder for it (``grafana_foundation_sdk.builders.stat``...).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders.dashboard import Dashboard, DashboardLink, Row
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="prometheus")
RATE = "$__rate_interval"
TAG = "sbs-gateway"
PANEL_WIDTH = 12
"""Grid columns of a panel (of 24): two panels to a line."""
PANEL_HEIGHT = 8
"""Grid rows of a panel."""


@dataclass(frozen=True)
class Query:
    """One PromQL query of a panel; ``legend`` is Grafana's legend format (``{{label}}`` for a label's value)."""

    expr: str
    legend: str


@dataclass(frozen=True)
class Graph:
    """One time-series panel: its title, the Grafana unit id of its values and its queries (refIds A, B... in order)."""

    title: str
    unit: str
    queries: Sequence[Query]


Group = tuple[str, list[Graph]]
"""(row title, panels): one row of a dashboard."""


def rate_by(counter: str, *labels: str, legend: str = "") -> Query:
    """The per-second rate of ``counter`` summed by ``labels``; the legend names the labels' values unless given."""
    by = ", ".join(labels)
    return Query(f"sum by ({by}) (rate({counter}[{RATE}]))", legend or " ".join(f"{{{{{label}}}}}" for label in labels))


def quantiles(histogram: str, name: str = "", by: Sequence[str] = ()) -> list[Query]:
    """p50, p90 and p99 of a Prometheus histogram (``histogram`` without ``_bucket``) over all its series, or per
    value of the ``by`` labels; ``name`` (then the ``by`` labels' values) starts each legend."""
    group = ", ".join(("le", *by))
    prefix = " ".join([*([name] if name else []), *(f"{{{{{label}}}}}" for label in by)])
    return [
        Query(
            f"histogram_quantile({q}, sum by ({group}) (rate({histogram}_bucket[{RATE}])))",
            f"{prefix} p{int(q * 100)}" if prefix else f"p{int(q * 100)}",
        )
        for q in (0.5, 0.9, 0.99)
    ]


TRAFFIC: list[Group] = [
    (
        "Requests",
        [
            Graph("Request rate by status", "reqps", [rate_by("gateway_requests_total", "status")]),
            Graph(
                "Error ratio (4xx and 5xx)",
                "percentunit",
                [
                    Query(
                        f'(sum(rate(gateway_requests_total{{status=~"[45].."}}[{RATE}])) or vector(0))'
                        f" / sum(rate(gateway_requests_total[{RATE}]))",
                        "errors",
                    ),
                    Query("gateway:requests:error_ratio_5m", "errors (5m)"),
                ],
            ),
            Graph(
                "Rejected before an engine, by reason",
                "reqps",
                [rate_by("gateway_rejected_requests_total", "reason")],
            ),
            Graph(
                "Upstream failures and retries",
                "reqps",
                [
                    rate_by("gateway_upstream_failures_total", "engine", "kind"),
                    rate_by("gateway_upstream_retries_total", "engine", legend="{{engine}} retried"),
                ],
            ),
            Graph(
                "In flight and draining",
                "short",
                [Query("sum(gateway_inflight_requests)", "in flight"), Query("max(gateway_draining)", "draining")],
            ),
        ],
    ),
    (
        "Latency",
        [
            Graph("TTFT at the gateway", "s", quantiles("gateway_ttft_seconds")),
            Graph("TTFT p99 by model (5m)", "s", [Query("gateway:ttft_seconds:p99_5m", "{{model}}")]),
            Graph(
                "TPOT (inter-token latency, engines)",
                "s",
                quantiles("vllm:inter_token_latency_seconds", "vLLM")
                + quantiles("sglang:inter_token_latency_seconds", "SGLang"),
            ),
            Graph("End-to-end latency at the gateway", "s", quantiles("gateway_e2e_latency_seconds")),
        ],
    ),
    (
        "Staggered window",
        [
            Graph("Time buffered in the window", "s", quantiles("gateway_window_wait_seconds")),
            Graph(
                "Requests per closed window",
                "short",
                [
                    *quantiles("gateway_window_batch_size"),
                    Query(
                        f"sum(rate(gateway_window_batch_size_sum[{RATE}]))"
                        f" / sum(rate(gateway_window_batch_size_count[{RATE}]))",
                        "mean",
                    ),
                ],
            ),
            Graph(
                "Windows closed per second",
                "ops",
                [Query(f"sum(rate(gateway_window_batch_size_count[{RATE}]))", "windows")],
            ),
            Graph("Window interval", "s", [Query("gateway_window_interval_seconds", "{{instance}}")]),
            Graph(
                "Requests buffered in the window", "short", [Query("gateway_window_buffered_requests", "{{instance}}")]
            ),
        ],
    ),
    (
        "Scheduler service (front doors sharing one scheduling view)",
        [
            Graph(
                "Front doors placing through the service (1) or alone (0)",
                "short",
                [Query("gateway_scheduler_service_mode", "{{instance}}")],
            ),
            Graph(
                "Falls back to local placement, and requests the service did not place in time",
                "short",
                [
                    Query(
                        f"sum by (instance) (increase(gateway_scheduler_service_fallbacks_total[{RATE}]))",
                        "{{instance}} fallbacks",
                    ),
                    Query(
                        f"sum by (instance) (increase(gateway_scheduler_service_replaced_total[{RATE}]))",
                        "{{instance}} placed locally instead",
                    ),
                ],
            ),
        ],
    ),
    (
        "Tenants and priority classes",
        [
            Graph("TTFT by priority class", "s", quantiles("gateway_class_ttft_seconds", by=("priority",))),
            Graph(
                "Requests refused by a tenant's rate limit (429)",
                "reqps",
                [rate_by("gateway_rate_limited_total", "tenant", "limit")],
            ),
        ],
    ),
]

ENGINES: list[Group] = [
    (
        "Engine health",
        [
            Graph("Engine in rotation (circuit breaker closed)", "short", [Query("gateway_engine_up", "{{engine}}")]),
            Graph("Active health probes", "ops", [rate_by("gateway_health_checks_total", "engine", "result")]),
            Graph(
                "Engine output throughput",
                "short",
                [
                    rate_by("vllm:generation_tokens_total", "engine_name", legend="{{engine_name}} tok/s"),
                    rate_by("sglang:generation_tokens_total", "engine_name", legend="{{engine_name}} tok/s"),
                ],
            ),
        ],
    ),
    (
        "Per-rank load and imbalance",
        [
            Graph(
                "Requests dispatched per DP rank",
                "reqps",
                [rate_by("gateway_dispatched_requests_total", "engine", "rank", legend="{{engine}}/{{rank}}")],
            ),
            Graph(
                "Prompt tokens dispatched per DP rank",
                "short",
                [rate_by("gateway_dispatched_prompt_tokens_total", "engine", "rank", legend="{{engine}}/{{rank}}")],
            ),
            Graph(
                "Rank imbalance (max / mean prompt tokens, 5m)",
                "short",
                [Query("gateway:rank_prompt_tokens:imbalance5m", "{{engine}}")],
            ),
            Graph(
                "Running and waiting per DP rank (gateway's load view)",
                "short",
                [
                    Query("gateway_rank_running", "{{engine}}/{{rank}} running"),
                    Query("gateway_rank_waiting", "{{engine}}/{{rank}} waiting"),
                ],
            ),
            Graph(
                "Queued prefill tokens per DP rank (gateway's load view)",
                "short",
                [Query("gateway_rank_queued_prefill_tokens", "{{engine}}/{{rank}}")],
            ),
            Graph(
                "KV cache usage per DP rank",
                "percentunit",
                [
                    Query("gateway_rank_kv_usage", "{{engine}}/{{rank}}"),
                    Query('vllm:kv_cache_usage_perc{job="engines"}', "{{engine_name}}/{{engine}} (engine)"),
                    Query('sglang:token_usage{job="engines"}', "{{engine_name}}/{{dp_rank}} (engine)"),
                ],
            ),
            Graph(
                "Engine-reported running and queued per DP rank",
                "short",
                [
                    Query("vllm:num_requests_running", "{{engine_name}}/{{engine}} running"),
                    Query("vllm:num_requests_waiting", "{{engine_name}}/{{engine}} waiting"),
                    Query(
                        "max by (engine_name, dp_rank) (sglang:num_running_reqs)", "{{engine_name}}/{{dp_rank}} running"
                    ),
                    Query(
                        "max by (engine_name, dp_rank) (sglang:num_queue_reqs)", "{{engine_name}}/{{dp_rank}} waiting"
                    ),
                ],
            ),
        ],
    ),
    (
        "Engine set (admin API, configuration reloads, discovery)",
        [
            Graph(
                "Engines added, drained and removed",
                "short",
                [
                    Query(
                        f"sum by (change, source) (increase(gateway_engine_changes_total[{RATE}]))",
                        "{{change}} by {{source}}",
                    )
                ],
            ),
            Graph("Engines draining", "short", [Query("gateway_engine_draining", "{{engine}}")]),
            Graph(
                "Configuration reloads (SIGHUP)",
                "short",
                [Query(f"sum by (result) (increase(gateway_config_reloads_total[{RATE}]))", "{{result}}")],
            ),
        ],
    ),
    (
        "Scrape health",
        [
            Graph("Prometheus targets up", "short", [Query("up", "{{job}} {{instance}}")]),
            Graph("Prometheus scrape duration", "s", [Query("scrape_duration_seconds", "{{job}} {{instance}}")]),
            Graph("Gateway scrapes of engine metrics", "ops", [rate_by("gateway_scrapes_total", "engine", "result")]),
            Graph(
                "Gateway scrape error ratio (5m)",
                "percentunit",
                [Query("gateway:engine_scrape_errors:ratio5m", "{{engine}}")],
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

PD: list[Group] = [
    (
        "P/D requests: legs and KV transfers",
        [
            Graph(
                "P/D attempts by protocol and outcome",
                "reqps",
                [rate_by("gateway_pd_transfers_total", "protocol", "outcome")],
            ),
            Graph(
                "Failed attempts (a leg or the KV transfer failed) / attempts",
                "percentunit",
                [
                    Query(
                        f"(sum by (protocol) (rate(gateway_pd_transfers_total{{{PD_FAILED}}}[{RATE}]))"
                        f' or 0 * sum by (protocol) (rate(gateway_pd_transfers_total{{outcome="ok"}}[{RATE}])))'
                        f" / sum by (protocol) (rate(gateway_pd_transfers_total{{{PD_TRIED}}}[{RATE}]))",
                        "{{protocol}}",
                    ),
                    Query("gateway:pd_transfers:failure_ratio5m", "{{protocol}} (5m)"),
                ],
            ),
            Graph(
                "Failed legs by engine, leg and kind",
                "reqps",
                [rate_by("gateway_pd_leg_failures_total", "engine", "leg", "kind")],
            ),
            Graph(
                "Retries after a failure, by the failed engine's role",
                "reqps",
                [Query(f"sum by (role) ({by_role(f'rate(gateway_upstream_retries_total[{RATE}])')})", "{{role}}")],
            ),
        ],
    ),
    (
        "Load by role (gateway's load view)",
        [
            Graph(
                "Running and waiting requests per pool",
                "short",
                [
                    Query(f"sum by (role) ({by_role('gateway_rank_running')})", "{{role}} running"),
                    Query(f"sum by (role) ({by_role('gateway_rank_waiting')})", "{{role}} waiting"),
                ],
            ),
            Graph(
                "Prefill ranks: queued prefill tokens",
                "short",
                [Query(by_role("gateway_rank_queued_prefill_tokens", "prefill"), "{{engine}}/{{rank}}")],
            ),
            Graph(
                "Decode ranks: KV cache usage",
                "percentunit",
                [
                    Query(by_role("gateway_rank_kv_usage", "decode"), "{{engine}}/{{rank}}"),
                    Query("gateway:decode_rank_kv_usage:avg", "{{engine}} mean"),
                ],
            ),
            Graph(
                "Decode ranks: running requests",
                "short",
                [Query(by_role("gateway_rank_running", "decode"), "{{engine}}/{{rank}}")],
            ),
        ],
    ),
    (
        "P/D queues inside the engines",
        [
            Graph(
                "Prefill: waiting for the decode side, holding KV for it (SGLang)",
                "short",
                [
                    Query(
                        per_dp_rank('sglang:num_prefill_bootstrap_queue_reqs{engine_type="prefill"}'),
                        "{{engine_name}}/{{dp_rank}} bootstrap",
                    ),
                    Query(
                        per_dp_rank('sglang:num_prefill_inflight_queue_reqs{engine_type="prefill"}'),
                        "{{engine_name}}/{{dp_rank}} inflight",
                    ),
                ],
            ),
            Graph(
                "Decode: requests waiting for their KV",
                "short",
                [
                    Query(
                        per_dp_rank('sglang:num_decode_prealloc_queue_reqs{engine_type="decode"}'),
                        "{{engine_name}}/{{dp_rank}} prealloc",
                    ),
                    Query(
                        per_dp_rank('sglang:num_decode_transfer_queue_reqs{engine_type="decode"}'),
                        "{{engine_name}}/{{dp_rank}} transfer",
                    ),
                    Query(
                        'vllm:num_requests_kv_fetch_by_stage{stage!="completed_waiting"}',
                        "{{engine_name}}/{{engine}} {{stage}}",
                    ),
                ],
            ),
            Graph(
                "Decode engines' KV cache usage (engine-reported)",
                "percentunit",
                [
                    Query('sglang:token_usage{engine_type="decode"}', "{{engine_name}}/{{dp_rank}}"),
                    Query('vllm:kv_cache_usage_perc{role="decode"}', "{{engine_name}}/{{engine}}"),
                ],
            ),
        ],
    ),
]
"""The P/D dashboard. Gateway series are read by role through ``gateway_engine_info``; engine series by SGLang's
``engine_type`` label or the ``role`` label of the engine's scrape target (deploy/prometheus/prometheus-pd.yml)."""


def timeseries(graph: Graph, panel_id: int) -> Timeseries:
    """The SDK's time-series panel for ``graph``, with the legend as a list below it.

    The tooltip is set to Grafana's own default (single series, unsorted: grafana-ui's
    ``options/builder/tooltip.tsx``), since the SDK would otherwise write an ascending sort."""
    panel = (
        Timeseries()
        .id(panel_id)
        .title(graph.title)
        .datasource(DATASOURCE)
        .span(PANEL_WIDTH)
        .height(PANEL_HEIGHT)
        .unit(graph.unit)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .tooltip(common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.SINGLE).sort(common.SortOrder.NONE))
    )
    for n, query in enumerate(graph.queries):
        panel.with_target(
            Dataquery().ref_id(chr(ord("A") + n)).datasource(DATASOURCE).expr(query.expr).legend_format(query.legend)
        )
    return panel


def dashboard(uid: str, title: str, groups: list[Group]) -> model.Dashboard:
    """A dashboard of open rows, one per group, each followed by its panels (the SDK lays them out on the grid), and
    a link menu to the other dashboards tagged ``sbs-gateway``."""
    builder = (
        Dashboard(title)
        .uid(uid)
        .tags([TAG])
        .timezone("browser")
        .version(1)
        .editable()
        .refresh("10s")
        .time("now-30m", "now")
        .link(DashboardLink("SBS gateway").type(model.DashboardLinkType.DASHBOARDS).tags([TAG]).as_dropdown(False))
    )
    panel_id = 0
    for row_title, graphs in groups:
        panel_id += 1
        builder.with_row(Row(row_title).id(panel_id).collapsed(False))
        for graph in graphs:
            panel_id += 1
            builder.with_panel(timeseries(graph, panel_id))
    return builder.build()


DASHBOARDS = {
    "sbs-gateway-traffic.json": dashboard("sbs-gateway-traffic", "SBS gateway: traffic and latency", TRAFFIC),
    "sbs-gateway-engines.json": dashboard("sbs-gateway-engines", "SBS gateway: engines", ENGINES),
    "sbs-gateway-pd.json": dashboard("sbs-gateway-pd", "SBS gateway: P/D disaggregation", PD),
}


def render(name: str) -> str:
    """The JSON text of dashboard file ``name`` (the SDK's encoding, keys sorted so a diff shows only changes)."""
    return JSONEncoder(indent=2, sort_keys=True).encode(DASHBOARDS[name]) + "\n"


def stale() -> list[str]:
    """The dashboard files that are missing or differ from :func:`render`, and JSON files no dashboard writes."""
    written = {path.name for path in OUT.glob("*.json")}
    differ = [name for name in DASHBOARDS if name not in written or (OUT / name).read_text("utf-8") != render(name)]
    return sorted([*differ, *(written - set(DASHBOARDS))])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write (or --check) deploy/grafana/dashboards/*.json.")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is stale")
    if parser.parse_args(argv).check:
        bad = stale()
        for name in bad:
            print(f"stale: {OUT / name}; run: python deploy/grafana/build_dashboards.py", file=sys.stderr)
        return 1 if bad else 0
    OUT.mkdir(exist_ok=True)
    for name in DASHBOARDS:
        (OUT / name).write_text(render(name), encoding="utf-8")
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
