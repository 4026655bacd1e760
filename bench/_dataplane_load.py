"""The load generator of the data-plane benchmark (``bench/dataplane.py``): closed-loop HTTP/1.1 keep-alive
connections, each sending the same pre-encoded request again as soon as the previous answer has ended.

Raw asyncio protocols over uvloop (what ``wrk`` does, in Python: no HTTP library on the hot path). An answer ends at
its ``Content-Length`` or at the last chunk of a chunked body (``0\\r\\n\\r\\n``); a stream counts as an error unless
it ends with ``data: [DONE]``, any answer unless it is HTTP 200. Latency runs from the request's write to the
answer's last byte.

It prints ``start`` when the measured span begins and ``end`` when it ends (``bench/dataplane.py`` reads the
front's CPU time at both), then one JSON line: requests and errors within the span, its length, and the latency's
50th, 90th and 99th percentiles in seconds.

    python bench/_dataplane_load.py --url http://127.0.0.1:8000 --connections 64 --seconds 8 --stream
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from array import array
from functools import partial
from typing import cast
from urllib.parse import urlsplit

import uvloop

_TERMINAL_CHUNK = b"\r\n0\r\n\r\n"


class Stats:
    """Counts and latencies of the measured span (``measuring`` is set while it runs)."""

    def __init__(self) -> None:
        self.measuring = False
        self.requests = 0
        self.errors = 0
        self.latencies = array("d")


class Client(asyncio.Protocol):
    """One connection sending ``request`` in a loop until ``stop`` is set."""

    def __init__(self, request: bytes, stats: Stats, stop: asyncio.Event, closed: asyncio.Future[None]) -> None:
        self.request = request
        self.stats = stats
        self.stop = stop
        self.closed = closed
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.body_start = -1
        self.length: int | None = None
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # uvloop's transports do not subclass asyncio's
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        if self.stop.is_set():
            self.transport.close()
            return
        self.buffer = b""
        self.body_start = -1
        self.sent_at = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        buffer = self.buffer
        if self.body_start < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self.body_start = end + 4
            head = buffer[:end].lower()
            at = head.find(b"content-length:")
            if at < 0:
                self.length = None
            else:
                eol = head.find(b"\r\n", at)
                self.length = int(head[at + 15 : eol if eol >= 0 else len(head)])
        if self.length is not None:
            if len(buffer) - self.body_start < self.length:
                return
        elif not (b"\r\n" + buffer[max(self.body_start, len(buffer) - 9) :]).endswith(_TERMINAL_CHUNK):
            return
        self._answered(buffer)

    def _answered(self, buffer: bytes) -> None:
        latency = time.perf_counter() - self.sent_at
        stats = self.stats
        if stats.measuring:
            ok = buffer.startswith(b"HTTP/1.1 200") and (self.length is not None or b"data: [DONE]" in buffer)
            stats.requests += 1
            stats.errors += not ok
            stats.latencies.append(latency)
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.stop.is_set() and self.stats.measuring:
            self.stats.errors += 1
        if not self.closed.done():
            self.closed.set_result(None)


def build_request(url: str, stream: bool, tokens: int, chat: bool) -> bytes:
    """The request every connection sends: a short chat (or completion) asking for ``tokens`` tokens."""
    parts = urlsplit(url)
    body: dict[str, object] = {"model": "bench-model", "max_tokens": tokens, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": "Say something short."}]
    else:
        body["prompt"] = "Say something short."
    payload = json.dumps(body).encode()
    path = "/v1/chat/completions" if chat else "/v1/completions"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def run(url: str, connections: int, warmup_s: float, seconds: float, request: bytes) -> dict[str, object]:
    """Drive ``connections`` closed loops: ``warmup_s`` unmeasured, then ``seconds`` measured."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    loop = asyncio.get_running_loop()
    stats, stop = Stats(), asyncio.Event()
    closed: list[asyncio.Future[None]] = []
    for _ in range(connections):
        done: asyncio.Future[None] = loop.create_future()
        closed.append(done)
        await loop.create_connection(partial(Client, request, stats, stop, done), host, port)
    await asyncio.sleep(warmup_s)
    print("start", flush=True)
    stats.measuring = True
    began = time.perf_counter()
    await asyncio.sleep(seconds)
    stats.measuring = False
    span = time.perf_counter() - began
    print("end", flush=True)
    stop.set()
    await asyncio.wait(closed, timeout=10)
    latencies = sorted(stats.latencies)
    n = len(latencies)
    quantiles = {f"p{q}_s": latencies[min(n - 1, n * q // 100)] if n else None for q in (50, 90, 99)}
    return {"requests": stats.requests, "errors": stats.errors, "span_s": span, **quantiles}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first [2]")
    ap.add_argument("--seconds", type=float, default=8.0, help="measured seconds [8]")
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--tokens", type=int, default=16, help="max_tokens (= SSE events of a stream) [16]")
    ap.add_argument("--completions", action="store_true", help="POST /v1/completions instead of chat")
    args = ap.parse_args()
    request = build_request(args.url, args.stream, args.tokens, not args.completions)
    result = uvloop.run(run(args.url, args.connections, args.warmup, args.seconds, request))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
