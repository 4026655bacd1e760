"""Two front doors sharing one scheduler service, in front of simulated engines: the service is killed in the middle
of a trace replay, and restarted. No request fails; each front door falls back (metric, one log line) and returns
to the restarted service."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import httpx
import pytest

from gateway.config import SchedulerServiceConfig, Settings
from gateway.replay.client import replay
from gateway.server.app import create_app
from gateway.serving import serve_in_background
from gateway.sim.cluster import SimulatedEngine, simulated_engines
from gateway.workload.traces import TraceRequest
from tests.helpers import eventually, total

MODEL = "m"
ENGINES = [SimulatedEngine("a", "vllm", 4, MODEL), SimulatedEngine("b", "sglang", 4, MODEL)]


def trace(seed: int, n: int, rate: float) -> list[TraceRequest]:
    """``n`` Poisson arrivals at ``rate`` a second, short prompts and answers (seeded)."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(TraceRequest(t, rng.randint(50, 800), rng.randint(4, 40)))
    return out


@contextlib.asynccontextmanager
async def service_process(config_path: Path, socket_path: Path, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """``gateway scheduler`` on ``socket_path``, once it answers; killed on exit if still running."""
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "scheduler",
            "--config",
            str(config_path),
            "--unix-socket",
            str(socket_path),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        async def answers() -> bool:
            if proc.returncode is not None:
                pytest.fail(f"the scheduler service exited with status {proc.returncode}; its log is {log}")
            return await service_metrics(socket_path) is not None

        await eventually(answers, timeout_s=60)
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def service_metrics(socket_path: Path) -> str | None:
    """The service's ``/metrics``, or ``None`` when it does not answer."""
    try:
        connector = aiohttp.UnixConnector(path=str(socket_path))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get("http://scheduler/metrics") as got,
        ):
            return await got.text()
    except aiohttp.ClientError:
        return None


async def metric(http: httpx.AsyncClient, url: str, name: str) -> float:
    return total((await http.get(url + "/metrics")).text, name)


async def test_killing_the_scheduler_service_mid_replay_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    socket_path = tmp_path / "scheduler.sock"
    service_log = tmp_path / "scheduler.log"
    async with simulated_engines(ENGINES) as engines:
        base = Settings(policy="sbs", engines=engines)
        config_path = tmp_path / "gateway.yaml"
        config_path.write_text(json.dumps({"policy": "sbs", "engines": [e.model_dump() for e in engines]}))
        front = base.model_copy(
            update={
                "scheduler_service": SchedulerServiceConfig(
                    url=f"unix:{socket_path}", deadline_s=0.5, probe_interval_s=0.05, probe_max_interval_s=0.2
                )
            }
        )
        async with contextlib.AsyncExitStack() as stack:
            first = await stack.enter_async_context(service_process(config_path, socket_path, service_log))
            urls = [await stack.enter_async_context(serve_in_background(create_app(front))) for _ in range(2)]
            http = await stack.enter_async_context(httpx.AsyncClient(timeout=30))
            requests = trace(seed=7, n=160, rate=40.0)
            halves = [requests[0::2], requests[1::2]]

            async def kill_and_restart() -> None:
                await asyncio.sleep(1.0)  # a quarter of the way through the 4-second trace
                before = await service_metrics(socket_path)
                assert before is not None and total(before, "gateway_dispatched_requests_total") > 0
                first.send_signal(signal.SIGKILL)
                await first.wait()

                async def both_fell_back() -> bool:
                    modes = [await metric(http, url, "gateway_scheduler_service_mode") for url in urls]
                    return modes == [0.0, 0.0]

                await eventually(both_fell_back)
                await stack.enter_async_context(service_process(config_path, socket_path, service_log))

            with caplog.at_level(logging.WARNING, logger="gateway.scheduler_service.remote"):
                results, _ = await asyncio.gather(
                    asyncio.gather(
                        *(
                            replay(url, half, model=MODEL, progress=False)
                            for url, half in zip(urls, halves, strict=True)
                        )
                    ),
                    kill_and_restart(),
                )

                async def both_returned() -> bool:
                    modes = [await metric(http, url, "gateway_scheduler_service_mode") for url in urls]
                    return modes == [1.0, 1.0]

                await eventually(both_returned)

            records = [r for result in results for r in result.records]
            assert len(records) == 160
            assert [r.error_detail for r in records if not r.ok] == []
            for url in urls:
                assert await metric(http, url, "gateway_scheduler_service_fallbacks_total") >= 1
            messages = [r.getMessage() for r in caplog.records]
            assert sum("placing requests locally until it answers again" in m for m in messages) == sum(
                [await metric(http, url, "gateway_scheduler_service_fallbacks_total") for url in urls]
            )
            assert sum("answers again" in m and "placing requests through it" in m for m in messages) >= 2

            # the restarted service places again: what the front doors send now goes through it
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            answers = await asyncio.gather(*(http.post(url + "/v1/chat/completions", json=body) for url in urls * 4))
            assert [a.status_code for a in answers] == [200] * 8
            text = await service_metrics(socket_path)
            assert text is not None and total(text, "gateway_dispatched_requests_total") >= 8
            for url in urls:
                assert await metric(http, url, "gateway_inflight_requests") == 0
