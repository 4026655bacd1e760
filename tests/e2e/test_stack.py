"""`gateway stack` end to end, as a new user runs it from the README: the simulated engines, the gateway and a real
Prometheus (Debian package) on loopback; requests go through; Prometheus shows every target up, the gateway's
series arrive, and the dashboards' queries return data. The same for its P/D variant, `gateway stack --pd`, and the
P/D dashboard."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from click.testing import CliRunner

from gateway.cli import main
from gateway.stack import StackError, stack_prometheus_config
from tests.deploy.tools import DEPLOY, ROOT, require_tool
from tests.exported_metrics import PROMETHEUS_SERIES, exposition_names, query_names

START_TIMEOUT_S = 60.0
DATA_TIMEOUT_S = 45.0
MODEL = "deepseek-v3"


@dataclass
class RunningStack:
    process: asyncio.subprocess.Process
    gateway: str
    engines: dict[str, str]
    prometheus: str
    prometheus_pid: int
    log: list[str]


async def read_announcements(process: asyncio.subprocess.Process, log: list[str]) -> None:
    assert process.stderr is not None
    while line := (await process.stderr.readline()).decode():
        log.append(line.rstrip())
        if line.startswith("stack ready"):
            return
    raise AssertionError("gateway stack exited before it was ready:\n" + "\n".join(log))


@contextlib.asynccontextmanager
async def gateway_stack(*args: str) -> AsyncIterator[RunningStack]:
    require_tool("prometheus")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "stack",
        *args,
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    log: list[str] = []
    prometheus_pid = None
    try:
        await asyncio.wait_for(read_announcements(process, log), START_TIMEOUT_S)
        text = "\n".join(log)
        engines = dict(re.findall(r"^engine (\S+) \(.*\): (\S+)$", text, re.M))
        prometheus, pid = re.findall(r"^prometheus: (\S+) \(pid (\d+)\)$", text, re.M)[0]
        prometheus_pid = int(pid)
        gateway = re.findall(r"^gateway \(\w+\): (\S+)/v1$", text, re.M)[0]
        yield RunningStack(process, gateway, engines, prometheus, prometheus_pid, log)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()
        if prometheus_pid is not None and pid_alive(prometheus_pid):
            os.kill(prometheus_pid, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def query(http: httpx.AsyncClient, prometheus: str, expr: str) -> list[dict[str, Any]]:
    """Instant query; fails the test if Prometheus rejects the expression."""
    reply = (await http.get(prometheus + "/api/v1/query", params={"query": expr})).json()
    assert reply["status"] == "success", f"Prometheus rejected {expr!r}: {reply}"
    result: list[dict[str, Any]] = reply["data"]["result"]
    return result


async def wait_for_data(http: httpx.AsyncClient, prometheus: str, exprs: list[str]) -> dict[str, int]:
    """Poll until every expression returns at least one series (or the timeout); the series count of each."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DATA_TIMEOUT_S
    while True:
        counts = {expr: len(await query(http, prometheus, expr)) for expr in exprs}
        if all(counts.values()) or loop.time() > deadline:
            return counts
        await asyncio.sleep(1.0)


PD_DASHBOARD = "sbs-gateway-pd.json"
"""The P/D dashboard: its panels read P/D engines, so on a stack without them its queries return nothing."""


def dashboard_queries(skip: str | None = None) -> list[str]:
    """Every dashboard query (but those of dashboard file ``skip``), Grafana's $__rate_interval set to 30 s."""
    out = []
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        if path.name == skip:
            continue
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                out.append(target["expr"].replace("$__rate_interval", "30s"))
    return out


def recorded_sources() -> dict[str, set[str]]:
    """Recorded series name → the source series its rule reads (recursively through other recorded ones)."""
    rules = [
        rule
        for path in (DEPLOY / "prometheus" / "rules").glob("*.yml")
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    ]
    direct = {rule["record"]: query_names(rule["expr"]) for rule in rules}

    def expand(names: set[str]) -> set[str]:
        return set().union(*({n} if n not in direct else expand(direct[n]) for n in names)) if names else set()

    return {name: expand(names) for name, names in direct.items()}


async def test_stack_serves_requests_and_prometheus_sees_every_series() -> None:
    async with gateway_stack(
        "--port", "0", "--prometheus", "--prometheus-port", "0", "--scrape-interval", "1", "--engine-speed", "20"
    ) as stack:
        assert set(stack.engines) == {"sg0", "vl0"}, stack.log
        client = openai.AsyncOpenAI(base_url=stack.gateway + "/v1", api_key="unused")
        for i in range(3):
            reply = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "hello " * (i + 1)}],
                max_tokens=5,
                extra_body={"ignore_eos": True},
            )
            assert reply.usage is not None and reply.usage.completion_tokens == 5
        async with trickling(client):
            await check_prometheus(stack, parse_only=PD_DASHBOARD)  # no P/D engine here
            await check_alerts_follow_an_engine_failure(stack)
        await check_clean_shutdown(stack)


async def test_pd_stack_serves_requests_and_the_pd_dashboard_has_data() -> None:
    """``gateway stack --pd``: requests go through the prefill and decode engines; with two KV transfers broken (and
    retried), the dashboards' panels, the P/D dashboard's failed legs and retries by role included, return data."""
    async with gateway_stack(
        "--pd", "--port", "0", "--prometheus-port", "0", "--scrape-interval", "1", "--engine-speed", "20"
    ) as stack:
        assert set(stack.engines) == {"prefill0", "decode0"}, stack.log
        assert re.search(r"^engine decode0 \(sglang decode, 4 DP ranks\): ", "\n".join(stack.log), re.M), stack.log
        client = openai.AsyncOpenAI(base_url=stack.gateway + "/v1", api_key="unused", max_retries=0)
        async with httpx.AsyncClient(timeout=10) as http:
            for _ in range(16):  # every decode rank answers first (one that never has is shut out at a failure)
                await client.completions.create(model=MODEL, prompt="hello", max_tokens=3)
            plan = {"generate": "transfer_fail", "remaining": 2}
            assert (await http.put(stack.engines["decode0"] + "/_sim/faults", json=plan)).status_code == 200
        async with trickling(client):
            await check_prometheus(stack)
        await check_clean_shutdown(stack)


@contextlib.asynccontextmanager
async def trickling(client: openai.AsyncOpenAI) -> AsyncIterator[None]:
    """Keep a trickle of traffic (:func:`trickle`) while the body runs, so that rates have counters that move
    between scrapes while Prometheus is queried; then stop it and close ``client``."""
    traffic = asyncio.create_task(trickle(client))
    try:
        yield
    finally:
        traffic.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await traffic
        await client.close()


async def check_clean_shutdown(stack: RunningStack) -> None:
    """SIGINT stops the stack with exit status 0, and its Prometheus with it."""
    stack.process.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(stack.process.wait(), 30) == 0, stack.log
    assert not pid_alive(stack.prometheus_pid), "Prometheus outlived the stack"


async def trickle(client: openai.AsyncOpenAI, requests: int = 400, gap_s: float = 0.2) -> None:
    """At most ``requests`` small completions, one every ``gap_s`` seconds."""
    for i in range(requests):
        await client.completions.create(
            model=MODEL, prompt="x" * (8 + 40 * (i % 7)), max_tokens=3, extra_body={"ignore_eos": True}
        )
        await asyncio.sleep(gap_s)


async def check_prometheus(stack: RunningStack, parse_only: str | None = None) -> None:
    """Every target is up, every series with samples arrives, every dashboard query whose series have samples
    returns data (those of dashboard file ``parse_only`` need only be valid PromQL), and the rules evaluate."""
    async with httpx.AsyncClient(timeout=10) as http:
        # every target up: the gateway, both engines, Prometheus itself
        targets = ['count(up{job="gateway"} == 1) == 1', 'count(up{job="engines"} == 1) == 2']
        counts = await wait_for_data(http, stack.prometheus, targets)
        assert all(counts.values()), f"targets not up: {await query(http, stack.prometheus, 'up')}"

        # every series the gateway and the engines export with samples arrives in Prometheus
        sampled: set[str] = set()
        for url in [stack.gateway, *stack.engines.values()]:
            text = (await http.get(url + "/metrics")).text
            sampled |= {n for n in exposition_names(text) if re.search(rf"^{re.escape(n)}[{{ ]", text, re.M)}
        gateway_series = {n for n in sampled if n.startswith("gateway_")}
        assert {"gateway_requests_total", "gateway_ttft_seconds_bucket", "gateway_rank_running"} <= gateway_series
        arrived = await wait_for_data(http, stack.prometheus, [f'count({{__name__="{n}"}})' for n in sampled])
        assert [e for e, n in arrived.items() if n == 0] == []

        # every dashboard query is valid PromQL, and returns data when the series it reads have samples
        sampled |= PROMETHEUS_SERIES
        sources = recorded_sources()
        expected = []
        for expr in dashboard_queries(skip=parse_only):
            names = set().union(*(sources.get(n, {n}) for n in query_names(expr)))
            if names <= sampled:
                expected.append(expr)
            else:
                await query(http, stack.prometheus, expr)  # still must parse
        assert len(expected) >= len(dashboard_queries(skip=parse_only)) * 2 // 3, "most panels should have data"
        for expr in set(dashboard_queries()) - set(dashboard_queries(skip=parse_only)):
            await query(http, stack.prometheus, expr)
        counts = await wait_for_data(http, stack.prometheus, expected)
        assert [e for e, n in counts.items() if n == 0] == []

        # the rules loaded and evaluate without errors
        for _ in range(int(DATA_TIMEOUT_S)):  # "unknown" until a rule's first evaluation
            groups = (await http.get(stack.prometheus + "/api/v1/rules")).json()["data"]["groups"]
            health = {rule["name"]: rule["health"] for group in groups for rule in group["rules"]}
            if "unknown" not in health.values():
                break
            await asyncio.sleep(1.0)
        assert health and set(health.values()) == {"ok"}, health


async def check_alerts_follow_an_engine_failure(stack: RunningStack) -> None:
    """Make engine vl0's /health fail and its /metrics hang (the simulated engines' fault injection): the
    gateway's breaker opens and neither it nor Prometheus can scrape the engine, so GatewayEngineDown,
    GatewayEngineScrapeFailing and PrometheusScrapeFailing turn pending for vl0 (they fire only after their
    `for`, 1-2 minutes), and no engine alert concerns sg0."""
    async with httpx.AsyncClient(timeout=10) as http:
        reply = await http.put(stack.engines["vl0"] + "/_sim/faults", json={"health": "fail", "metrics": "hang"})
        assert reply.status_code == 200, reply.text
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DATA_TIMEOUT_S
        vl0_target = stack.engines["vl0"].split("//")[1]
        want = {("GatewayEngineDown", "vl0"), ("GatewayEngineScrapeFailing", "vl0")}
        want.add(("PrometheusScrapeFailing", vl0_target))
        seen: set[tuple[str, str]] = set()
        while loop.time() < deadline:
            alerts = (await http.get(stack.prometheus + "/api/v1/alerts")).json()["data"]["alerts"]
            seen = {
                (a["labels"]["alertname"], a["labels"].get("engine") or a["labels"].get("instance", ""))
                for a in alerts
                if a["state"] == "pending"
            }
            if want <= seen:
                break
            await asyncio.sleep(1.0)
        assert want <= seen, f"expected pending {want}, got {seen}"
        sg0 = {(name, where) for name, where in seen if where in ("sg0", stack.engines["sg0"].split("//")[1])}
        assert {name for name, _ in sg0} <= {"GatewayRankImbalance"}, f"sg0 is healthy, yet {sg0}"


def test_stack_refuses_a_prometheus_target_it_cannot_place() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    placed = stack_prometheus_config(
        config,
        gateway="127.0.0.1:1",
        prometheus="127.0.0.1:2",
        engines={"engine-sglang:30000": "127.0.0.1:3", "engine-vllm:8001": "127.0.0.1:4"},
        rules_dir=DEPLOY / "prometheus",
        scrape_interval_s=0.5,
    )
    targets = [t for job in placed["scrape_configs"] for g in job["static_configs"] for t in g["targets"]]
    assert sorted(targets) == ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"]
    assert placed["global"]["scrape_interval"] == "500ms"
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in placed["rule_files"])
    with pytest.raises(StackError, match="engine-vllm:8001"):
        stack_prometheus_config(
            config, gateway="a:1", prometheus="b:2", engines={"engine-sglang:30000": "c:3"}, rules_dir=DEPLOY
        )


def test_stack_outside_the_repository_says_where_to_run_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["stack", "--no-prometheus"])
    assert result.exit_code == 1
    assert "run gateway stack from the repository root, or pass --config" in result.output
