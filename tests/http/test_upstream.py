"""The engine seam: a pooled connection the engine closed behind our back is retried, not failed."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator

import pytest

from gateway.config import UpstreamConfig
from gateway.engines.client import EngineClient
from gateway.errors import UpstreamError, UpstreamUnavailableError
from tests.helpers import raw_http_server

ANSWER = b'{"ok": true}'


@contextlib.asynccontextmanager
async def keepalive_liar() -> AsyncIterator[tuple[str, list[int]]]:
    """A server that answers the first request of each connection with keep-alive, and hangs up on any later
    request of that connection without processing it: what an engine closing an idle connection looks like to
    a client that reuses it at that very moment."""
    served: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = True
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            if not first:
                break  # idle timeout: drop the request unread
            first = False
            length = next(
                int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
            )
            await reader.readexactly(length)
            served.append(1)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)
            )
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}/v1/completions", served


async def test_a_stale_pooled_connection_is_retried_on_a_fresh_one() -> None:
    async with keepalive_liar() as (url, served), EngineClient(UpstreamConfig()) as client:
        for _ in range(3):
            resp = await client.post_json(url, b"{}", {}, headers_timeout_s=5, total_timeout_s=5)
            assert resp.status == 200
            assert await resp.read() == ANSWER
            resp.close()
    assert len(served) == 3  # each request ran exactly once


async def test_an_engine_that_keeps_dropping_connections_is_unavailable() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, EngineClient(UpstreamConfig()) as client:
        with pytest.raises(UpstreamUnavailableError):
            await client.post_json(
                f"http://127.0.0.1:{port}/v1/completions", b"{}", {}, headers_timeout_s=5, total_timeout_s=5
            )


async def hang(writer: asyncio.StreamWriter) -> None:
    """Answer nothing, then hang up after 0.2 s to free the socket."""
    await asyncio.sleep(0.2)


async def test_a_get_text_loop_always_stops_when_cancelled() -> None:
    """Cancelling a task that loops over timed-out GETs ends it, whenever the cancel lands.

    With aiohttp's own ``ClientTimeout(total=...)`` about 5% of such cancels turned into a TimeoutError and the
    loop went on (aiohttp issue #5979): the prober and the scraper then never stopped and shutdown hung.
    """
    rng = random.Random(1)
    still_running = 0
    async with raw_http_server(hang) as url:
        client = EngineClient(UpstreamConfig())

        async def poll_forever() -> None:
            while True:
                with contextlib.suppress(UpstreamError):
                    await client.get_text(url, 0.01, 1000)

        try:
            for _ in range(300):
                task = asyncio.create_task(poll_forever())
                await asyncio.sleep(rng.uniform(0.0, 0.03))
                task.cancel()
                done, _ = await asyncio.wait([task], timeout=1.0)
                if not done:
                    still_running += 1
                    task.cancel()
                    await asyncio.wait([task], timeout=1.0)
        finally:
            await client.aclose()
    assert still_running == 0, f"{still_running} of 300 cancelled tasks went on running"
