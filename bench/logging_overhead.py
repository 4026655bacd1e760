"""What the front door's per-request middleware costs: request id + access log (JSON or text) and the API-key check.

Calls a trivial ASGI app directly (no sockets, no event-loop hops), N times in a row, bare and wrapped, and
reports microseconds per request; the difference is the middleware's cost on the hot path. Log lines go to
/dev/null through the same handler ``gateway serve`` installs, at INFO, so formatting and writing are counted.

    .venv/bin/python bench/logging_overhead.py [--requests 20000]

prints the figures and writes ``bench/results/logging_overhead.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.logs import LogFormat, make_handler
from gateway.server.auth import ApiKeyMiddleware, KeyRing
from gateway.server.request_context import RequestContextMiddleware

RESULTS = Path(__file__).parent / "results"
KEY = "sk-bench-0123456789abcdef"
SCOPE: Scope = {
    "type": "http",
    "method": "POST",
    "path": "/v1/chat/completions",
    "headers": [(b"x-request-id", b"bench-request"), (b"authorization", f"Bearer {KEY}".encode())],
}
BODY = b'{"id": "x", "object": "chat.completion", "choices": []}'


async def trivial_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": BODY})


async def per_request_us(app: ASGIApp, n: int) -> float:
    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        pass

    for _ in range(200):  # warm up
        await app(dict(SCOPE), receive, send)
    started = time.perf_counter()
    for _ in range(n):
        await app(dict(SCOPE), receive, send)
    return (time.perf_counter() - started) / n * 1e6


def with_logging(fmt: LogFormat) -> logging.Handler:
    handler = make_handler(fmt, open(os.devnull, "w"))  # noqa: SIM115 - closed by the caller
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    return handler


async def run(n: int) -> dict[str, Any]:
    keys = KeyRing([KEY, "sk-other-1", "sk-other-2"])
    figures: dict[str, float] = {"bare": await per_request_us(trivial_app, n)}
    figures["request_id_no_access_log"] = await per_request_us(
        RequestContextMiddleware(trivial_app, access_log_enabled=False), n
    )
    for fmt in ("json", "text"):
        handler = with_logging(fmt)
        figures[f"request_id_access_log_{fmt}"] = await per_request_us(RequestContextMiddleware(trivial_app), n)
        handler.stream.close()  # type: ignore[attr-defined]
    handler = with_logging("json")
    guarded = ApiKeyMiddleware(trivial_app, api_keys=keys, admin_keys=KeyRing([]), protect_metrics=False)
    figures["api_key_check_3_keys"] = await per_request_us(guarded, n)
    figures["all_json"] = await per_request_us(RequestContextMiddleware(guarded), n)
    handler.stream.close()  # type: ignore[attr-defined]
    bare = figures["bare"]
    return {
        "requests": n,
        "us_per_request": {k: round(v, 2) for k, v in figures.items()},
        "overhead_us": {k: round(v - bare, 2) for k, v in figures.items() if k != "bare"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    args = parser.parse_args()
    result = asyncio.run(run(args.requests))
    for name, value in result["us_per_request"].items():
        print(f"{name:<28} {value:8.2f} µs/request")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "logging_overhead.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
