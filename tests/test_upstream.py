"""The engine seam: a pooled connection the engine closed behind our back is retried, not failed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from gateway.config import UpstreamConfig
from gateway.errors import UpstreamUnavailableError
from gateway.server.upstream import make_session, post_json

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
    async with keepalive_liar() as (url, served):
        session = make_session(UpstreamConfig())
        try:
            for _ in range(3):
                resp = await post_json(session, url, b"{}", {}, headers_timeout_s=5, total_timeout_s=5)
                assert resp.status == 200
                assert await resp.read() == ANSWER
                resp.close()
        finally:
            await session.close()
    assert len(served) == 3  # each request ran exactly once


async def test_an_engine_that_keeps_dropping_connections_is_unavailable() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        session = make_session(UpstreamConfig())
        try:
            with pytest.raises(UpstreamUnavailableError):
                await post_json(
                    session,
                    f"http://127.0.0.1:{port}/v1/completions",
                    b"{}",
                    {},
                    headers_timeout_s=5,
                    total_timeout_s=5,
                )
        finally:
            await session.close()
