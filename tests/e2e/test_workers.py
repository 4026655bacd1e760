"""``gateway serve --workers 2``: two front-door processes on one port and the scheduler service, supervised."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from gateway.sim.cluster import SimulatedEngine, free_port, simulated_engines
from tests.helpers import eventually, gateway_serve_process, total

MODEL = "m"
ENGINE = SimulatedEngine("e", "vllm", 4, MODEL)
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@contextlib.asynccontextmanager
async def workers_process(tmp_path: Path, engine_url: str) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    port = free_port()
    config = {
        "policy": "round_robin",
        "port": port,
        "shutdown": {"drain_timeout_s": 5},
        # the supervision is under test, not the deadline: a loaded CI machine must not make a front door fall back
        "scheduler_service": {"url": "unix:/replaced-by-the-supervisor", "deadline_s": 2.0},
        "engines": [{"name": "e", "flavor": "vllm", "url": engine_url, "dp_size": 4, "models": [MODEL]}],
    }
    async with gateway_serve_process(tmp_path, config, "--workers", "2", ready_timeout_s=60) as running:
        yield running


def pids(log: Path, pattern: str) -> list[int]:
    return [int(p) for p in re.findall(pattern, log.read_text())]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(FileNotFoundError):
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    return False


async def test_two_front_doors_share_the_service_restart_when_killed_and_stop_on_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "gateway.log"
    async with (
        simulated_engines([ENGINE]) as [engine],
        workers_process(tmp_path, engine.url) as (url, proc),
        httpx.AsyncClient(timeout=30) as http,
    ):

        async def both_front_doors_up() -> bool:
            return len(pids(log, r"front door \d \(pid (\d+)\)")) == 2

        await eventually(both_front_doors_up, timeout_s=60)
        answers = await asyncio.gather(*(http.post(url + "/v1/chat/completions", json=BODY) for _ in range(16)))
        assert [a.status_code for a in answers] == [200] * 16
        # round robin through one scheduler: the 16 requests spread evenly over the 4 ranks, whichever front door
        # took each connection (the supervisor's service URL replaced the configured one, its deadline was kept)
        engine_metrics = (await http.get(engine.url + "/metrics")).text
        per_rank = [total(engine_metrics, "vllm:request_success_total", engine=str(r)) for r in range(4)]
        assert per_rank == [4.0] * 4
        assert "fallback" not in log.read_text()

        first = pids(log, r"front door \d \(pid (\d+)\)")[0]
        os.kill(first, signal.SIGKILL)

        async def restarted() -> bool:
            return len(pids(log, r"front door \d \(pid (\d+)\)")) == 3

        await eventually(restarted, timeout_s=60)
        assert "exited with status -9: restarting it" in log.read_text()
        answers = await asyncio.gather(*(http.post(url + "/v1/chat/completions", json=BODY) for _ in range(8)))
        assert [a.status_code for a in answers] == [200] * 8

        children = pids(log, r"front door \d \(pid (\d+)\)")[1:] + pids(log, r"scheduler service \(.*pid (\d+)\)")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        assert not any(alive(pid) for pid in children)
        assert "scheduler service stopped" in log.read_text()


async def test_children_do_not_outlive_a_killed_supervisor(tmp_path: Path) -> None:
    log = tmp_path / "gateway.log"
    async with simulated_engines([ENGINE]) as [engine], workers_process(tmp_path, engine.url) as (_, proc):

        async def both_front_doors_up() -> bool:
            return len(pids(log, r"front door \d \(pid (\d+)\)")) == 2

        await eventually(both_front_doors_up, timeout_s=60)
        children = pids(log, r"front door \d \(pid (\d+)\)") + pids(log, r"scheduler service \(.*pid (\d+)\)")
        assert len(children) == 3
        proc.kill()
        await proc.wait()

        async def all_gone() -> bool:
            return not any(alive(pid) for pid in children)

        await eventually(all_gone, timeout_s=30)
