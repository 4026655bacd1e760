"""Graceful shutdown: ``gateway serve`` in a subprocess gets SIGTERM while requests are buffered and in flight."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway.server.app import create_app
from gateway.serving import serve_in_background
from gateway.sim.cluster import SimulatedEngine, free_port, simulated_engines
from tests.helpers import eventually, gateway_serve_process, total

MODEL = "m"
ENGINE = SimulatedEngine("e", "vllm", 2, MODEL)


@contextlib.asynccontextmanager
async def gateway_process(
    tmp_path: Path, engine_url: str, drain_s: int
) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    port = free_port()
    config = {
        "policy": "sbs",
        "port": port,
        "shutdown": {"drain_timeout_s": drain_s},
        "engines": [{"name": "e", "flavor": "vllm", "url": engine_url, "dp_size": 2, "models": [MODEL]}],
    }
    async with gateway_serve_process(tmp_path, config, "--log-level", "warning", ready_timeout_s=30) as running:
        yield running


async def engine_metric(http: httpx.AsyncClient, engine_url: str, name: str, **labels: str) -> float:
    return total((await http.get(engine_url + "/metrics")).text, name, **labels)


async def wait_exit(proc: asyncio.subprocess.Process, timeout_s: float) -> int:
    try:
        return await asyncio.wait_for(proc.wait(), timeout_s)
    except TimeoutError:
        pytest.fail(f"the gateway did not exit within {timeout_s} s of SIGTERM")


async def test_sigterm_drains_buffered_and_in_flight_requests_with_zero_failures(tmp_path: Path) -> None:
    async with simulated_engines([ENGINE]) as [engine], gateway_process(tmp_path, engine.url, 30) as (url, proc):
        engine_url = engine.url
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "ignore_eos": True}
        started = asyncio.Event()
        first_events = 0

        async def stream(http: httpx.AsyncClient) -> list[str]:
            nonlocal first_events
            async with http.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                events = []
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        if not events:
                            first_events += 1
                            if first_events == 4:
                                started.set()
                        events.append(line[5:].strip())
                return events

        async def whole(http: httpx.AsyncClient) -> int:
            return (await http.post(url + "/v1/chat/completions", json=body)).status_code

        async with httpx.AsyncClient(timeout=60) as http:
            streams = [asyncio.create_task(stream(http)) for _ in range(4)]
            await asyncio.wait_for(started.wait(), 30)
            wholes = [asyncio.create_task(whole(http)) for _ in range(3)]
            await asyncio.sleep(0.05)  # the non-streamed ones reach the gateway (window or engine)
            proc.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*streams)
            statuses = await asyncio.gather(*wholes)
            assert await wait_exit(proc, 30) == 0
            for events in results:
                assert events[-1] == "[DONE]" and len(events) == 62, "60 tokens, the final chunk, [DONE]"
                assert not any('"error"' in e for e in events)
            assert statuses == [200, 200, 200]
            with pytest.raises(httpx.ConnectError):
                await http.get(url + "/health")
            assert await engine_metric(http, engine_url, "vllm:request_success_total", finished_reason="abort") == 0


async def test_past_the_drain_time_requests_are_cut_and_aborted_on_the_engine_none_orphaned(tmp_path: Path) -> None:
    async with simulated_engines([ENGINE]) as [engine], gateway_process(tmp_path, engine.url, 1) as (url, proc):
        engine_url = engine.url
        body = {"model": MODEL, "prompt": "x", "max_tokens": 100_000, "ignore_eos": True, "stream": True}
        async with httpx.AsyncClient(timeout=60) as http:

            async def endless() -> None:
                with contextlib.suppress(httpx.HTTPError):
                    async with http.stream("POST", url + "/v1/completions", json=body) as r:
                        async for _ in r.aiter_bytes():
                            pass

            tasks = [asyncio.create_task(endless()) for _ in range(3)]

            async def running() -> bool:
                return await engine_metric(http, engine_url, "vllm:num_requests_running") == 3

            await eventually(running, timeout_s=30)
            proc.send_signal(signal.SIGTERM)
            assert await wait_exit(proc, 30) == 0
            await asyncio.gather(*tasks)

            async def all_aborted() -> bool:
                aborted = await engine_metric(http, engine_url, "vllm:request_success_total", finished_reason="abort")
                return aborted == 3 and await engine_metric(http, engine_url, "vllm:num_requests_running") == 0

            await eventually(all_aborted)


async def test_ready_turns_503_once_draining_begins() -> None:
    from gateway.config import Settings

    async with simulated_engines([ENGINE], speed=20.0) as engines:
        settings = Settings(engines=engines)
        app = create_app(settings)
        async with serve_in_background(app) as url, httpx.AsyncClient() as http:
            assert (await http.get(url + "/ready")).status_code == 200
            app.state.gateway.begin_drain()
            ready = await http.get(url + "/ready")
            assert ready.status_code == 503 and ready.json()["draining"] is True
            assert total((await http.get(url + "/metrics")).text, "gateway_draining") == 1
