"""A trivial OpenAI engine for the data-plane benchmark (``bench/dataplane.py``): answers at once, costs next to
nothing, so the front in front of it is what is measured.

SGLang-flavoured with ``dp_size`` DP ranks, on raw asyncio protocols over uvloop (no framework; measured against
``gateway mock-engine``, which is a FastAPI app and would be the bottleneck, in ``bench/results/dataplane.md``):

- ``POST /v1/chat/completions`` and ``/v1/completions``: the body is parsed (``stream``, ``max_tokens``,
  ``stream_options.include_usage``) and the DP rank read from ``routed_dp_rank`` (the gateway's SGLang adapter),
  ``data_parallel_rank`` (smg, vllm-router) or the ``X-data-parallel-rank`` header (vLLM), else chosen round robin.
  A non-streamed answer is one JSON object of ``max_tokens`` tokens; a stream is chunked SSE, one ``data:`` event
  per token (each its own write, the loop yielding between them, as an engine sends one event per step), then the
  usage chunk when asked for, then ``data: [DONE]``.
- What the fronts read: ``GET /health``, ``/health_generate``, ``/metrics`` (SGLang's per-rank gauges, with the
  requests in flight per rank), ``/get_server_info`` and ``/server_info`` (``dp_size``), ``/get_model_info`` and
  ``/model_info``, ``/v1/models``, ``/v1/loads`` and ``/get_load``; ``GET /_bench/ranks`` gives the requests
  served per rank.

    python bench/_dataplane_upstream.py --port 8100 --dp-size 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time
from collections.abc import Iterator
from typing import Any, cast

import uvloop

MODEL = "bench-model"


class Engine:
    """The state shared by every connection: ranks, counters, pre-encoded answer pieces."""

    def __init__(self, dp_size: int, model: str) -> None:
        self.dp_size = dp_size
        self.model = model
        self.served = [0] * dp_size
        self.inflight = [0] * dp_size
        self.next_rank = 0

    def rank(self, body: dict[str, Any], headers: dict[bytes, bytes]) -> int:
        for name in ("routed_dp_rank", "data_parallel_rank"):
            value = body.get(name)
            if isinstance(value, int) and 0 <= value < self.dp_size:
                return value
        pinned = headers.get(b"x-data-parallel-rank")
        if pinned is not None and pinned.isdigit() and int(pinned) < self.dp_size:
            return int(pinned)
        self.next_rank = (self.next_rank + 1) % self.dp_size
        return self.next_rank

    def metrics(self) -> bytes:
        lines = []
        for name, values in (
            ("sglang:num_running_reqs", self.inflight),
            ("sglang:num_queue_reqs", [0] * self.dp_size),
            ("sglang:token_usage", [0] * self.dp_size),
        ):
            lines.append(f"# TYPE {name} gauge")
            for rank, value in enumerate(values):
                labels = f'model_name="{self.model}",tp_rank="0",pp_rank="0",moe_ep_rank="{rank}",dp_rank="{rank}"'
                lines.append(f"{name}{{{labels}}} {value}")
        return ("\n".join(lines) + "\n").encode()

    def get(self, path: bytes) -> tuple[int, bytes, bytes]:
        """Status, content type and body of a GET."""
        path = path.split(b"?", 1)[0]
        json_type = b"application/json"
        if path in (b"/health", b"/health_generate"):
            return 200, b"text/plain", b""
        if path == b"/metrics":
            return 200, b"text/plain; version=0.0.4", self.metrics()
        info: Any
        if path in (b"/get_server_info", b"/server_info"):
            info = {"dp_size": self.dp_size, "tp_size": 1, "model_path": self.model, "served_model_name": self.model}
        elif path in (b"/get_model_info", b"/model_info"):
            info = {"model_path": self.model, "tokenizer_path": self.model, "is_generation": True}
        elif path == b"/v1/models":
            info = {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "bench"}]}
        elif path in (b"/v1/loads", b"/get_load"):
            loads = [
                {"dp_rank": r, "num_running_reqs": n, "num_waiting_reqs": 0, "num_waiting_uncached_tokens": 0}
                for r, n in enumerate(self.inflight)
            ]
            info = {"loads": loads} if path == b"/v1/loads" else loads
        elif path == b"/_bench/ranks":
            info = {"served": self.served}
        else:
            return 404, json_type, b'{"error": "not found"}'
        return 200, json_type, json.dumps(info).encode()


def _head(status: int, content_type: bytes, length: int | None) -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}.get(status, b"Error")
    framing = b"transfer-encoding: chunked" if length is None else b"content-length: %d" % length
    return b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\n%s\r\n\r\n" % (status, reason, content_type, framing)


_FIRST = {
    True: b'{"index": 0, "delta": {"role": "assistant", "content": "x "}, "finish_reason": null}',
    False: b'{"index": 0, "text": "x ", "finish_reason": null}',
}
_MIDDLE = {True: b'{"index": 0, "delta": {"content": "x "}, "finish_reason": null}', False: _FIRST[False]}
_LAST = {
    True: b'{"index": 0, "delta": {"content": "x "}, "finish_reason": "length"}',
    False: b'{"index": 0, "text": "x ", "finish_reason": "length"}',
}
"""The choice of a stream's first, middle and last event, chat (``True``) or completions."""


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Connection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection; requests are answered in order (a stream is written by a task, and
    the next request on the connection waits for it)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.streaming: tuple[Iterator[bytes], int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # uvloop's transports do not subclass asyncio's
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.streaming is None:
            self._serve()

    def _serve(self) -> None:
        while self.streaming is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].split(b"\r\n")
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get(b"content-length", b"0"))
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            method, path, _ = head[0].split(b" ", 2)
            if method == b"POST":
                self._complete(path, body, headers)
            else:
                status, content_type, payload = self.engine.get(path)
                self._write(_head(status, content_type, len(payload)) + payload)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _complete(self, path: bytes, raw: bytes, headers: dict[bytes, bytes]) -> None:
        try:
            body = json.loads(raw)
        except ValueError:
            self._write(_head(400, b"application/json", 2) + b"{}")
            return
        engine = self.engine
        rank = engine.rank(body, headers)
        engine.served[rank] += 1
        chat = path.startswith(b"/v1/chat")
        tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        prompt_tokens = len(raw) // 4
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens}
        envelope = {"id": "cmpl-bench", "created": int(time.time()), "model": body.get("model", engine.model)}
        if not body.get("stream"):
            if chat:
                choice: dict[str, Any] = {
                    "index": 0,
                    "message": {"role": "assistant", "content": "x " * tokens},
                    "finish_reason": "length",
                }
            else:
                choice = {"index": 0, "text": "x " * tokens, "finish_reason": "length"}
            answer = {**envelope, "object": "chat.completion" if chat else "text_completion", "choices": [choice]}
            payload = json.dumps({**answer, "usage": usage}).encode()
            self._write(_head(200, b"application/json", len(payload)) + payload)
            return
        options = body.get("stream_options")
        with_usage = isinstance(options, dict) and options.get("include_usage") is True
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = b"data: " + json.dumps({**envelope, "object": obj})[:-1].encode() + b', "choices": ['
        events = [
            head + (_LAST[chat] if i == tokens - 1 else _FIRST[chat] if i == 0 else _MIDDLE[chat]) + b"]}\n\n"
            for i in range(tokens)
        ]
        if with_usage:
            events.append(head + b"], " + json.dumps({"usage": usage})[1:].encode() + b"\n\n")
        self.streaming = (iter(events), rank)
        engine.inflight[rank] += 1
        self._write(_head(200, b"text/event-stream", None))
        asyncio.get_running_loop().call_soon(self._next_event)

    def _next_event(self) -> None:
        """Write the stream's next event, then yield to the loop (one event a loop turn, as an engine sends one per
        step); after the last, the end marker and the last chunk."""
        if self.streaming is None:
            return
        events, rank = self.streaming
        event = next(events, None)
        if event is not None:
            self._write(_chunk(event))
            asyncio.get_running_loop().call_soon(self._next_event)
            return
        self._write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        self.engine.inflight[rank] -= 1
        self.streaming = None
        if self.buffer:
            self._serve()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.streaming is not None:
            self.engine.inflight[self.streaming[1]] -= 1
            self.streaming = None
        self.transport = None


async def serve(host: str, port: int, dp_size: int, model: str) -> None:
    """Serve until cancelled."""
    engine = Engine(dp_size, model)
    server = await asyncio.get_running_loop().create_server(lambda: Connection(engine), host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dp-size", type=int, default=4)
    ap.add_argument("--model", default=MODEL)
    args = ap.parse_args()
    uvloop.run(serve(args.host, args.port, args.dp_size, args.model))


if __name__ == "__main__":
    main()
