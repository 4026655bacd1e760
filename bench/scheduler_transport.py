"""Which transport between front doors and the scheduler service: the round trip and CPU of one placement.

A placement's request (a pending request as :mod:`gateway.scheduler_service.protocol` encodes it, about 230 bytes
of JSON) and answer (about 90 bytes) are exchanged 3,000 times in a row (after 200 to warm up) by one client and
one server in one process, so the CPU figure covers both ends of the call; each transport runs in a process of
its own:

- aiohttp (the gateway's HTTP client and server library): HTTP/1.1 keep-alive, JSON, over TCP loopback and over
  a Unix socket;
- grpcio: a unary call carrying the same JSON bytes (grpc.aio client, the threaded server), over TCP loopback and
  a Unix socket. grpcio is not a dependency of the gateway: its rows are measured when the Python running the
  script has it (``pip install grpcio``), and left out otherwise.

    .venv/bin/python bench/scheduler_transport.py

prints one JSON line per transport and writes ``bench/results/scheduler_transport.json``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
CALLS = 3000
WARMUP = 200
REQUEST = {
    "request": {
        "id": "chatcmpl-4f1c2b9e0d7a4e8c",
        "model": "deepseek-v3",
        "prompt_tokens": 1234,
        "max_output_tokens": 256,
        "age_s": 0.0001,
        "stream": True,
        "prefix_blocks": [11400714819323198485, 2654435761, 40503, 9007199254740993],
    }
}
ANSWER = {"rank": ["sglang-0", 3], "window_id": None, "decode_rank": None, "epoch": "5f0e1d2c3b4a6978"}


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _aiohttp(kind: str) -> tuple[list[float], float]:
    import aiohttp
    from aiohttp import web

    async def place(request: web.Request) -> web.Response:
        json.loads(await request.read())
        return web.json_response(ANSWER)

    app = web.Application()
    app.router.add_post("/v1/place", place)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    with tempfile.TemporaryDirectory() as tmp:
        site: web.BaseSite
        connector: aiohttp.BaseConnector
        if kind == "unix":
            site = web.UnixSite(runner, f"{tmp}/s.sock")
            connector = aiohttp.UnixConnector(path=f"{tmp}/s.sock")
            await site.start()
            url = "http://scheduler/v1/place"
        else:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            connector = aiohttp.TCPConnector()
            await site.start()
            server = site._server
            assert isinstance(server, asyncio.base_events.Server)
            url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/place"
        body = json.dumps(REQUEST)
        headers = {"Content-Type": "application/json"}
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(WARMUP):
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
            latencies = []
            cpu = _cpu_s()
            for _ in range(CALLS):
                start = time.perf_counter()
                async with session.post(url, data=json.dumps(REQUEST), headers=headers) as response:
                    json.loads(await response.read())
                latencies.append(time.perf_counter() - start)
            cpu = _cpu_s() - cpu
    await runner.cleanup()
    return latencies, cpu


def _grpc(kind: str) -> tuple[list[float], float]:
    from concurrent import futures

    grpc: Any = importlib.import_module("grpc")  # not a dependency: measured where installed

    def place(request: bytes, context: Any) -> bytes:
        json.loads(request)
        return json.dumps(ANSWER).encode()

    handler = grpc.method_handlers_generic_handler(
        "scheduler.Scheduler", {"Place": grpc.unary_unary_rpc_method_handler(place)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "unix":
            address = f"unix:{tmp}/s.sock"
            server.add_insecure_port(address)
        else:
            address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        server.start()

        async def run() -> tuple[list[float], float]:
            async with grpc.aio.insecure_channel(address) as channel:
                call = channel.unary_unary("/scheduler.Scheduler/Place")
                for _ in range(WARMUP):
                    await call(json.dumps(REQUEST).encode())
                latencies = []
                cpu = _cpu_s()
                for _ in range(CALLS):
                    start = time.perf_counter()
                    json.loads(await call(json.dumps(REQUEST).encode()))
                    latencies.append(time.perf_counter() - start)
                return latencies, _cpu_s() - cpu

        try:
            return asyncio.run(run())
        finally:
            server.stop(None)


def measure(transport: str) -> dict[str, Any]:
    """One transport's figures (``aiohttp-tcp``, ``aiohttp-unix``, ``grpc-tcp``, ``grpc-unix``)."""
    library, kind = transport.split("-")
    latencies, cpu = asyncio.run(_aiohttp(kind)) if library == "aiohttp" else _grpc(kind)
    latencies.sort()
    return {
        "transport": transport,
        "calls": CALLS,
        "p50_ms": round(latencies[len(latencies) // 2] * 1e3, 3),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1e3, 3),
        "cpu_ms_per_call": round(cpu / CALLS * 1e3, 3),
    }


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(measure(sys.argv[2])))
        return
    transports = ["aiohttp-tcp", "aiohttp-unix"]
    if importlib.util.find_spec("grpc") is not None:
        transports += ["grpc-tcp", "grpc-unix"]
    rows = []
    for transport in transports:
        out = subprocess.run([sys.executable, __file__, "--one", transport], check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout))
        print(out.stdout.strip())
    versions = {"python": platform.python_version()}
    for name in ("aiohttp", "grpc"):
        if importlib.util.find_spec(name) is not None:
            versions[name] = __import__(name).__version__
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scheduler_transport.json").write_text(json.dumps({"versions": versions, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
