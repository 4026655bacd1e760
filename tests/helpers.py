"""Builders shared by the tests (no hidden state): requests, rank loads and load views for the table tests; the
echo engine, a gateway in front of it and a cluster of simulated engines for the loopback tests; log capture and
the openai streaming call."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from openai.types.chat import ChatCompletionChunk

from gateway.config import EngineConfig, EngineFlavor, PolicyName, ScrapeConfig, Settings, UpstreamConfig
from gateway.load.view import EngineSpec, LoadView
from gateway.logs import make_handler
from gateway.serving import serve_in_background
from gateway.sim.cluster import NotReady, SimulatedEngine, running_gateway, simulated_engines, wait_ready
from gateway.telemetry import sum_samples
from gateway.tokens import Tokenizer
from gateway.types import PendingRequest, RankKey, RankLoad

MODEL = "deepseek-v3"
"""The model of the simulated engines and of the table tests."""


def req(
    request_id: str, prompt_tokens: int, arrival_s: float = 0.0, model: str = MODEL, blocks: tuple[int, ...] = ()
) -> PendingRequest:
    """A pending request with 128 output tokens (and the prefix blocks ``blocks``)."""
    return PendingRequest(request_id, model, prompt_tokens, 128, arrival_s, prefix_blocks=blocks)


def rank(
    engine: str,
    index: int,
    *,
    queued: float = 0.0,
    running: float = 0.0,
    waiting: float = 0.0,
    kv_tokens: float = 0.0,
    kv_usage: float | None = None,
    budget: int = 8192,
    usable: bool = True,
    models: frozenset[str] = frozenset({MODEL}),
) -> RankLoad:
    """A rank load snapshot."""
    return RankLoad(
        key=RankKey(engine, index),
        models=models,
        running=running,
        waiting=waiting,
        queued_prefill_tokens=queued,
        kv_tokens=kv_tokens,
        kv_usage=kv_usage,
        prefill_budget=budget,
        usable=usable,
    )


def make_view(
    *engines: str,
    dp_size: int = 2,
    budget: int = 8192,
    model: str = MODEL,
    stale_after_s: float = 3.0,
    **options: Any,
) -> LoadView:
    """A load view of ``engines`` (default one, ``"e"``), each with ``dp_size`` ranks serving ``model`` with a
    prefill budget of ``budget`` tokens per rank per step; ``options`` go to :class:`LoadView` (``usable``,
    ``state_sync``, ``nonstream_prefill_s``)."""
    specs = [EngineSpec(name, dp_size, frozenset({model}), budget) for name in engines or ("e",)]
    return LoadView(specs, stale_after_s=stale_after_s, **options)


total = sum_samples
"""Sum of the samples ``name`` with ``labels`` in exposition text."""


async def eventually(probe, timeout_s: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    """Poll ``probe`` (an async predicate) until it holds; fail after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await probe():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"condition {probe.__name__} still false after {timeout_s} s")
        await asyncio.sleep(0.05)


Respond = Callable[[asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_http_server(respond: Respond) -> AsyncIterator[str]:
    """A loopback server that reads a request head and lets ``respond`` write whatever bytes it likes."""
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await reader.readuntil(b"\r\n\r\n")
            await respond(writer)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            handlers.discard(task)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        await server.wait_closed()


# Servers on loopback.


@dataclass
class Cluster:
    """Simulated engines behind a gateway, all serving :data:`MODEL`."""

    gateway_url: str
    engine_urls: dict[str, str]
    """Engine name → base URL."""
    settings: Settings
    """The gateway's settings."""


@contextlib.asynccontextmanager
async def running_cluster(
    policy: PolicyName = "sbs", *, speed: float = 20.0, dp_size: int = 4, **settings: Any
) -> AsyncIterator[Cluster]:
    """An SGLang- (``"sg"``) and a vLLM-flavoured (``"vl"``) simulated engine of ``dp_size`` ranks each, at clock
    speed ``speed``, behind a gateway with ``policy``, a 0.1 s scrape and ``settings``."""
    specs = [SimulatedEngine("sg", "sglang", dp_size, MODEL), SimulatedEngine("vl", "vllm", dp_size, MODEL)]
    async with simulated_engines(specs, speed) as engines:
        settings.setdefault("scrape", ScrapeConfig(interval_s=0.1, timeout_s=1.0))
        built = Settings(policy=policy, engines=engines, **settings)
        async with running_gateway(built) as gateway_url:
            yield Cluster(gateway_url, {e.name: e.url for e in engines}, built)


ECHO_MODEL = "m"
"""The model the echo engine's gateway serves."""
CHAT = {"model": ECHO_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
"""A chat completion request for the echo engine's gateway."""


def echo_engine() -> FastAPI:
    """An engine that answers with what it received; body field ``fail`` makes it misbehave."""
    app = FastAPI()

    async def handle(request: Request) -> Response:
        body = await request.json()
        fail = body.get("fail")
        if fail == "sglang-flat":
            flat = {"object": "error", "message": "bad thing", "type": "BadRequestError", "param": None, "code": 400}
            return JSONResponse(flat, 400)
        if fail == "500":
            return PlainTextResponse("engine exploded", 500)
        if body.get("stream"):

            async def events() -> AsyncIterator[bytes]:
                for i in range(3):
                    yield f"data: {json.dumps({'i': i})}\n\n".encode()
                if fail == "mid-stream":
                    # let the chunks reach the gateway first: aiohttp drops bytes that arrive in the same read
                    # as a broken connection (StreamReader.readany raises before returning its buffer)
                    await asyncio.sleep(0.1)
                    raise RuntimeError("engine died mid-stream")
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse({"echo_body": body, "echo_headers": dict(request.headers)})

    app.add_api_route("/v1/chat/completions", handle, methods=["POST"])
    app.add_api_route("/v1/completions", handle, methods=["POST"])
    app.add_api_route("/metrics", lambda: PlainTextResponse(""), methods=["GET"])
    app.add_api_route("/health", lambda: PlainTextResponse(""), methods=["GET"])
    return app


@contextlib.asynccontextmanager
async def gateway_before(
    flavor: EngineFlavor,
    policy: PolicyName = "round_robin",
    url: str | None = None,
    tokenizer: Tokenizer | None = None,
    **settings_extra: Any,
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a gateway with ``policy`` and ``settings_extra`` in front of one ``flavor`` engine of 4 DP ranks
    serving :data:`ECHO_MODEL`: the one at ``url``, or else an :func:`echo_engine`. In front of the echo engine,
    whose answers are no completions, the gateway sends requests as the client sent them (no stream asked for a
    non-streamed request, no usage asked for) unless ``settings_extra`` sets ``upstream``."""
    async with contextlib.AsyncExitStack() as exits:
        if url is None:
            url = await exits.enter_async_context(serve_in_background(echo_engine()))
            settings_extra.setdefault("upstream", UpstreamConfig(stream_nonstreamed=False, stream_usage=False))
        settings = Settings(
            policy=policy,
            engines=[EngineConfig(name="e", flavor=flavor, url=url, dp_size=4, models=[ECHO_MODEL])],
            **settings_extra,
        )
        gateway_url = await exits.enter_async_context(running_gateway(settings, tokenizer=tokenizer))
        client = await exits.enter_async_context(httpx.AsyncClient(base_url=gateway_url, timeout=10))
        yield client


@contextlib.contextmanager
def captured_logs() -> Iterator[io.StringIO]:
    """Every record, DEBUG and up, of every logger, as JSON lines."""
    stream = io.StringIO()
    handler = make_handler("json", stream)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


async def stream_chat(client: openai.AsyncOpenAI, model: str, max_tokens: int = 12) -> list[ChatCompletionChunk]:
    """Every chunk of a streamed chat completion of exactly ``max_tokens`` tokens (``ignore_eos``), usage included."""
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    return [chunk async for chunk in stream]


@contextlib.asynccontextmanager
async def gateway_serve_process(
    tmp_path: Path, config: dict[str, Any], *args: str, ready_timeout_s: float
) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """``gateway serve --config`` of ``config`` (which names its ``port``) in a child process, its output in
    ``tmp_path/gateway.log``: yields the gateway's URL once ``/ready`` answers, and the process (killed on exit if
    still running). ``args`` are more ``serve`` options; the test fails with the log if it never gets ready."""
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", *args, "--config", str(path), stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{config['port']}"
    try:
        try:
            await wait_ready(url + "/ready", timeout_s=ready_timeout_s, is_alive=lambda: proc.returncode is None)
        except NotReady as exc:
            pytest.fail(f"{exc}; its log:\n{log.read_text()}")
        yield url, proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
