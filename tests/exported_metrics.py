"""The metric names the gateway and the simulated engines export, and the metric names a PromQL query reads.

Used to check that every dashboard query and every Prometheus rule reads a series that exists.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import httpx
import openai

from gateway.config import EngineConfig, SchedulerServiceConfig, ScrapeConfig, Settings
from gateway.embedded import embedded_engines
from gateway.server.app import build_state
from gateway.sim.cluster import running_gateway
from tests.helpers import MODEL, Cluster

PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
"""Series Prometheus itself adds to every target."""
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_DURATION = re.compile(r"\[[^\]]*\]")
_OURS = ("gateway_", "gateway:", "vllm:", "sglang:", "engine:")


def exposition_names(text: str) -> set[str]:
    """Every series name an exposition declares (``# HELP``/``# TYPE``, present even for labelled metrics with
    no children yet) or carries, histograms with their ``_bucket``/``_sum``/``_count`` series."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("# HELP ", "# TYPE ")):
            parts = line.split()
            names.add(parts[2])
            if line.startswith("# TYPE ") and parts[3] == "histogram":
                names.update(parts[2] + suffix for suffix in _HISTOGRAM_SUFFIXES)
            if line.startswith("# TYPE ") and parts[3] == "counter" and not parts[2].endswith("_total"):
                names.add(parts[2] + "_total")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def query_names(expr: str) -> set[str]:
    """Identifiers in a PromQL expression that name series of ours (``gateway_*``, ``vllm:*``, recorded
    ``gateway:*``...) or Prometheus' own (``up``...); string literals, ranges and Grafana variables ignored."""
    bare = _DURATION.sub("", _STRING.sub('""', expr.replace("$__rate_interval", "1m")))
    tokens = set(_IDENTIFIER.findall(bare))
    return {t for t in tokens if t.startswith(_OURS) or t in PROMETHEUS_SERIES}


async def exported_names(cluster: Cluster, requests: int = 3) -> set[str]:
    """Send a few requests through ``cluster``'s gateway, then collect the names of the gateway's and every
    engine's ``/metrics``."""
    client = openai.AsyncOpenAI(base_url=cluster.gateway_url + "/v1", api_key="unused")
    for _ in range(requests):
        await client.completions.create(model=MODEL, prompt="hello", max_tokens=4, extra_body={"ignore_eos": True})
    await client.close()
    names: set[str] = set()
    async with httpx.AsyncClient() as http:
        for url in [cluster.gateway_url, *cluster.engine_urls.values()]:
            names |= exposition_names((await http.get(url + "/metrics")).text)
    return names


async def pd_exported_names(requests: int = 3) -> set[str]:
    """The names of the gateway's and the engines' ``/metrics`` in front of the embedded P/D pairs, an SGLang one and
    a vLLM one (a P/D engine exports queue gauges a mixed one does not), after a few requests through each."""
    names: set[str] = set()
    for pd in ("sglang", "vllm-nixl"):
        async with embedded_engines(speed=10.0, pd=pd) as engines:
            settings = Settings(engines=engines, scrape=ScrapeConfig(interval_s=0.1, timeout_s=1.0))
            async with running_gateway(settings) as url:
                names |= await exported_names(Cluster(url, {e.name: e.url for e in engines}, settings), requests)
    return names


async def service_front_door_names() -> set[str]:
    """The names of a front door's ``/metrics`` when it places through a scheduler service (its
    :class:`~gateway.scheduler_service.remote.RemoteDispatcher` adds the service's metrics), from the registry the
    route renders; the service itself need not run (a front door exports them from its start)."""
    engine = EngineConfig(name="e", flavor="vllm", url="http://127.0.0.1:1", dp_size=2, models=[MODEL])
    settings = Settings(engines=[engine], scheduler_service=SchedulerServiceConfig(url="unix:/nonexistent.sock"))
    state = build_state(settings)
    try:
        return exposition_names(state.metrics.render().decode())
    finally:
        await state.client.aclose()


def unknown_names(exprs: Iterable[str], known: set[str]) -> dict[str, set[str]]:
    """For each expression naming a series not in ``known`` (or naming none at all), the offending names."""
    bad: dict[str, set[str]] = {}
    for expr in exprs:
        names = query_names(expr)
        if not names:
            bad[expr] = {"<no metric>"}
        elif names - known:
            bad[expr] = names - known
    return bad
