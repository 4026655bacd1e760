"""deploy/grafana: the dashboards are the generator's output, use the provisioned datasource, and every query in
them and in the Prometheus rules reads a series that the gateway or an engine flavour exports."""

from __future__ import annotations

import importlib.util
import json
from types import ModuleType

import yaml

from tests.deploy.tools import DEPLOY
from tests.exported_metrics import (
    PROMETHEUS_SERIES,
    exported_names,
    pd_exported_names,
    query_names,
    service_front_door_names,
    unknown_names,
)
from tests.helpers import Cluster

GRAFANA = DEPLOY / "grafana"
RULE_FILES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))


def load_builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_dashboards", GRAFANA / "build_dashboards.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboard_exprs() -> list[str]:
    exprs = []
    for path in sorted((GRAFANA / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            exprs += [target["expr"] for target in panel.get("targets", [])]
    return exprs


def rules() -> list[dict[str, str]]:
    return [rule for p in RULE_FILES for group in yaml.safe_load(p.read_text())["groups"] for rule in group["rules"]]


def test_dashboards_are_the_generators_output() -> None:
    builder = load_builder()
    files = {p.name for p in (GRAFANA / "dashboards").glob("*.json")}
    assert files == set(builder.DASHBOARDS), "run: python deploy/grafana/build_dashboards.py"
    for name in files:
        assert (GRAFANA / "dashboards" / name).read_text() == builder.render(name), (
            f"{name} is stale; run: python deploy/grafana/build_dashboards.py"
        )


def test_panels_use_the_provisioned_datasource() -> None:
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uids = {source["uid"] for source in provisioned["datasources"]}
    for path in (GRAFANA / "dashboards").glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] in uids, (path.name, panel["title"])
                assert panel["targets"], (path.name, panel["title"])


def test_query_names_reads_series_names_only() -> None:
    expr = 'sum by (engine) (rate(gateway_scrapes_total{result="gateway_x"}[$__rate_interval])) / up'
    assert query_names(expr) == {"gateway_scrapes_total", "up"}
    assert query_names("histogram_quantile(0.9, sum by (le) (rate(vllm:ttft_bucket[5m])))") == {"vllm:ttft_bucket"}


async def test_every_query_reads_an_exported_series(cluster: Cluster) -> None:
    exported = await exported_names(cluster) | await pd_exported_names() | await service_front_door_names()
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    known = exported | recorded | PROMETHEUS_SERIES
    # the series the issue names must be among them, declared even before any label set is used
    for name in ("gateway_engine_up", "gateway_upstream_failures_total", "gateway_rejected_requests_total"):
        assert name in exported, f"{name} not in the gateway's /metrics"
    for name in ("vllm:num_requests_running", "sglang:num_running_reqs", "sglang:inter_token_latency_seconds_bucket"):
        assert name in exported, f"{name} not in the engines' /metrics"
    # and the P/D dashboard's: the legs and transfers, the engines' roles, the P/D engines' queues
    for name in ("gateway_pd_transfers_total", "gateway_pd_leg_failures_total", "gateway_engine_info"):
        assert name in exported, f"{name} not in the gateway's /metrics"
    for name in ("sglang:num_decode_prealloc_queue_reqs", "vllm:num_requests_kv_fetch_by_stage"):
        assert name in exported, f"{name} not in the P/D engines' /metrics"
    for name in ("gateway_scheduler_service_mode", "gateway_scheduler_service_fallbacks_total"):
        assert name in exported, f"{name} not in a front door's /metrics"
    assert unknown_names(dashboard_exprs(), known) == {}
    assert unknown_names([rule["expr"] for rule in rules()], known) == {}
