"""deploy/grafana: the dashboards are the generator's output (grafana-foundation-sdk's builders, the build for the
stack's Grafana), load in the SDK's dashboard model, use the provisioned datasource, and every query in them and in
the Prometheus rules reads a series that the gateway or an engine flavour exports."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.prometheus import Dataquery
from grafana_foundation_sdk.models.timeseries import Options as TimeseriesOptions

from tests.deploy.tools import DEPLOY, ROOT
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
    sys.modules[spec.name] = module  # its dataclasses look their module up while they are made
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


def test_check_mode_fails_on_a_stale_or_unknown_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builder = load_builder()
    shutil.copytree(GRAFANA / "dashboards", tmp_path, dirs_exist_ok=True)
    monkeypatch.setattr(builder, "OUT", tmp_path)
    assert builder.main(["--check"]) == 0
    stale = tmp_path / "sbs-gateway-pd.json"
    stale.write_text(stale.read_text().replace('"title": "SBS gateway: P/D', '"title": "P/D'))
    assert builder.stale() == ["sbs-gateway-pd.json"]
    assert builder.main(["--check"]) == 1
    assert builder.main([]) == 0
    (tmp_path / "old-dashboard.json").write_text("{}")
    assert builder.main(["--check"]) == 1


def subset(written: Any, read_back: Any, path: str = "") -> list[str]:
    """The paths of ``written`` that ``read_back`` lacks or holds with another value (extra keys are allowed)."""
    if isinstance(written, dict) and isinstance(read_back, dict):
        return [p for k, v in written.items() for p in subset(v, read_back.get(k, ...), f"{path}.{k}")]
    if isinstance(written, list) and isinstance(read_back, list) and len(written) == len(read_back):
        pairs = enumerate(zip(written, read_back, strict=True))
        return [p for i, (a, b) in pairs for p in subset(a, b, f"{path}[{i}]")]
    return [] if written == read_back else [path]


def test_dashboards_load_in_the_sdks_dashboard_model() -> None:
    """Decoded with the SDK's models (its panel and query plugins registered) and encoded again, every field written
    comes back with its value: each is one the SDK's schema for this Grafana knows, none is dropped or retyped."""
    register_default_plugins()
    for path in sorted((GRAFANA / "dashboards").glob("*.json")):
        written = json.loads(path.read_text())
        decoded = model.Dashboard.from_json(written)
        assert subset(written, json.loads(JSONEncoder().encode(decoded))) == [], path.name
        panels = [p for p in decoded.panels or [] if isinstance(p, model.Panel)]
        assert panels, path.name
        for panel in panels:
            assert isinstance(panel.options, TimeseriesOptions), (path.name, panel.title)
            assert all(isinstance(t, Dataquery) for t in panel.targets or []), (path.name, panel.title)


def test_the_sdk_is_the_build_for_the_stacks_grafana() -> None:
    """grafana-foundation-sdk publishes one build per Grafana minor (``<epoch>!11.2.0``): the pinned one is the
    compose files' Grafana, and the dashboards carry its schema version."""
    sdk_grafana = importlib.metadata.version("grafana-foundation-sdk").partition("!")[2]
    for compose in ("docker-compose.yml", "docker-compose.pd.yml"):
        image = yaml.safe_load((ROOT / compose).read_text())["services"]["grafana"]["image"]
        assert image.rpartition(":")[2].split(".")[:2] == sdk_grafana.split(".")[:2], (compose, image, sdk_grafana)
    for path in (GRAFANA / "dashboards").glob("*.json"):
        assert json.loads(path.read_text())["schemaVersion"] == model.Dashboard().schema_version == 39, path.name


def test_a_panel_is_one_line_of_a_table() -> None:
    builder = load_builder()
    graph, query = builder.Graph, builder.Query
    groups = [
        (
            "Priorities and tenants",
            [
                graph("TTFT by priority class", "s", builder.quantiles("gateway_ttft_seconds", by=("priority",))),
                graph("Rate-limited", "reqps", [builder.rate_by("gateway_rate_limited_total", "tenant", "limit")]),
                graph("Engines draining", "short", [query("gateway_engine_draining", "{{engine}}")]),
            ],
        ),
        ("Reloads", [graph("Config reloads", "ops", [builder.rate_by("gateway_config_reloads_total", "result")])]),
    ]
    built = json.loads(JSONEncoder().encode(builder.dashboard("t", "T", groups)))
    layout = [(p["id"], p["type"], p["gridPos"]) for p in built["panels"]]
    assert layout == [
        (1, "row", {"x": 0, "y": 0, "w": 24, "h": 1}),
        (2, "timeseries", {"x": 0, "y": 1, "w": 12, "h": 8}),
        (3, "timeseries", {"x": 12, "y": 1, "w": 12, "h": 8}),
        (4, "timeseries", {"x": 0, "y": 9, "w": 12, "h": 8}),
        (5, "row", {"x": 0, "y": 17, "w": 24, "h": 1}),
        (6, "timeseries", {"x": 0, "y": 18, "w": 12, "h": 8}),
    ]
    ttft, limited = built["panels"][1], built["panels"][2]
    assert ttft["fieldConfig"]["defaults"]["unit"] == "s"
    assert [(t["refId"], t["legendFormat"]) for t in ttft["targets"]] == [
        ("A", "{{priority}} p50"),
        ("B", "{{priority}} p90"),
        ("C", "{{priority}} p99"),
    ]
    assert ttft["targets"][2]["expr"] == (
        "histogram_quantile(0.99, sum by (le, priority) (rate(gateway_ttft_seconds_bucket[$__rate_interval])))"
    )
    assert limited["targets"] == [
        {
            "refId": "A",
            "datasource": {"type": "prometheus", "uid": "prometheus"},
            "expr": "sum by (tenant, limit) (rate(gateway_rate_limited_total[$__rate_interval]))",
            "legendFormat": "{{tenant}} {{limit}}",
        }
    ]


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
