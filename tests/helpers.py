"""Small builders shared by the tests (no fixtures with hidden state)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.telemetry import sum_samples
from gateway.types import PendingRequest, RankKey, RankLoad

MODEL = "deepseek-v3"


def req(request_id: str, prompt_tokens: int, arrival_s: float = 0.0, model: str = MODEL) -> PendingRequest:
    """A pending request with 128 output tokens."""
    return PendingRequest(request_id, model, prompt_tokens, 128, arrival_s)


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
