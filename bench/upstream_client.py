"""Which HTTP client for the gateway's engine traffic: httpx.AsyncClient or aiohttp, at 50 concurrent requests.

Starts a minimal JSON server (aiohttp.web, in its own process, so client and server do not share an event
loop), then sends the same POSTs through each client from 50 concurrent workers and reports requests per
second. The gateway's upstream seam (``gateway/engines/client.py``) uses the faster one.

    .venv/bin/python bench/upstream_client.py [--requests 5000] [--concurrency 50]

prints the figures and writes ``bench/results/upstream_client.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time
from pathlib import Path

import aiohttp
import httpx
from aiohttp import web

from gateway.sim.cluster import free_port, wait_ready

RESULTS = Path(__file__).parent / "results"
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()


def serve(port: int) -> None:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"id": "x", "object": "chat.completion", "choices": []})

    async def health(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


async def run_httpx(url: str, total: int, concurrency: int) -> float:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits) as client:
        return await drive(
            lambda: client.post(url, content=BODY, headers={"content-type": "application/json"}), total, concurrency
        )


async def run_aiohttp(url: str, total: int, concurrency: int) -> float:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def one() -> None:
            async with session.post(url, data=BODY, headers={"content-type": "application/json"}) as resp:
                await resp.read()

        return await drive(one, total, concurrency)


async def drive(call, total: int, concurrency: int) -> float:  # type: ignore[no-untyped-def]
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=50)
    args = ap.parse_args()
    port = free_port()
    server = multiprocessing.Process(target=serve, args=(port,), daemon=True)
    server.start()
    asyncio.run(wait_ready(f"http://127.0.0.1:{port}/health", timeout_s=10, is_alive=server.is_alive))
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    results = {}
    for name, fn in (("httpx.AsyncClient", run_httpx), ("aiohttp.ClientSession", run_aiohttp)):
        asyncio.run(fn(url, 200, args.concurrency))  # warm-up
        results[name] = asyncio.run(fn(url, args.requests, args.concurrency))
        print(f"{name:<24}{results[name]:>10,.0f} req/s at {args.concurrency} concurrent")
    server.terminate()
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "upstream_client.json"
    out.write_text(
        json.dumps({"concurrency": args.concurrency, "requests": args.requests, "req_per_s": results}, indent=2)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
