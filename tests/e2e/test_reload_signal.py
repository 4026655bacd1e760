"""SIGHUP reloads the configuration file of ``gateway serve --config``: alone, and with ``--workers 2`` (the supervisor
passes it on to both front doors and the scheduler service, which all take the new engine)."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import httpx

from gateway.config import EngineConfig
from gateway.sim.cluster import SimulatedEngine, free_port, simulated_engines
from tests.helpers import eventually, gateway_serve_process, total

MODEL = "m"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def config(port: int, engines: list[EngineConfig], **more: Any) -> dict[str, Any]:
    return {
        "policy": "round_robin",
        "port": port,
        "health": {"probe_interval_s": 0.2},
        "engines": [e.model_dump(mode="json") for e in engines],
        **more,
    }


async def test_sighup_refuses_a_bad_file_and_applies_a_good_one(tmp_path: Path) -> None:
    specs = [SimulatedEngine("a", "vllm", 2, MODEL), SimulatedEngine("b", "sglang", 2, MODEL)]
    async with simulated_engines(specs, 20.0) as (a, b), httpx.AsyncClient(timeout=30) as http:
        port = free_port()
        async with gateway_serve_process(tmp_path, config(port, [a]), ready_timeout_s=60) as (url, proc):
            path = tmp_path / "gateway.yaml"
            path.write_text(json.dumps(config(port, [a, b], policy="nope")))
            proc.send_signal(signal.SIGHUP)

            async def refused() -> bool:
                text = (await http.get(url + "/metrics")).text
                return total(text, "gateway_config_reloads_total", result="refused") == 1

            await eventually(refused)
            assert [e["name"] for e in (await http.get(url + "/admin/engines")).json()["data"]] == ["a"]
            assert "configuration reload refused" in (tmp_path / "gateway.log").read_text()

            path.write_text(json.dumps(config(port, [a, b])))
            proc.send_signal(signal.SIGHUP)

            async def applied() -> bool:
                engines = (await http.get(url + "/admin/engines")).json()["data"]
                return [(e["name"], e["state"]) for e in engines] == [("a", "ready"), ("b", "ready")]

            await eventually(applied)
            answers = await asyncio.gather(*(http.post(url + "/v1/chat/completions", json=BODY) for _ in range(8)))
            assert [r.status_code for r in answers] == [200] * 8
            text = (await http.get(url + "/metrics")).text
            assert total(text, "gateway_dispatched_requests_total", engine="b") == 4
            assert total(text, "gateway_config_reloads_total", result="applied") == 1
            assert proc.returncode is None


async def test_sighup_reaches_every_front_door_and_the_scheduler_service(tmp_path: Path) -> None:
    specs = [SimulatedEngine("a", "vllm", 2, MODEL), SimulatedEngine("b", "sglang", 2, MODEL)]
    async with simulated_engines(specs, 20.0) as (a, b), httpx.AsyncClient(timeout=30) as http:
        port = free_port()
        service = {"url": "unix:/replaced-by-the-supervisor", "deadline_s": 2.0}
        first = config(port, [a], scheduler_service=service)
        async with gateway_serve_process(tmp_path, first, "--workers", "2", ready_timeout_s=60) as (url, proc):
            path = tmp_path / "gateway.yaml"
            path.write_text(json.dumps(config(port, [a, b], scheduler_service=service)))
            proc.send_signal(signal.SIGHUP)
            log = tmp_path / "gateway.log"

            async def all_reloaded() -> bool:  # two front doors and the service
                return log.read_text().count("configuration reloaded: engines added ['b']") == 3

            await eventually(all_reloaded, timeout_s=30)
            refused = await http.post(url + "/admin/engines/b/drain")
            assert refused.status_code == 409  # under --workers the engine set changes by SIGHUP only
            # fresh connections reach both front doors; each places through the service, on a and b
            for _ in range(16):
                async with httpx.AsyncClient(timeout=30) as fresh:
                    assert (await fresh.post(url + "/v1/chat/completions", json=BODY)).status_code == 200
            dispatched_b = 0.0
            for _ in range(8):
                async with httpx.AsyncClient(timeout=30) as fresh:
                    text = (await fresh.get(url + "/metrics")).text
                dispatched_b = max(dispatched_b, total(text, "gateway_dispatched_requests_total", engine="b"))
                assert total(text, "gateway_scheduler_service_fallbacks_total") == 0
            assert dispatched_b > 0
            assert proc.returncode is None
