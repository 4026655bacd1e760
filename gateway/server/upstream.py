"""The one seam through which the gateway talks HTTP to engines.

Built on ``aiohttp``: on this machine (2 cores) plain ``httpx.AsyncClient`` fell to about 160 req/s at 50
concurrent requests where aiohttp sustained 1,300–2,700 req/s (DEVELOPERS.md; re-measure with
``bench/upstream_client.py``). Every aiohttp failure is translated here into a
:class:`~gateway.errors.GatewayError`, so nothing above this module sees an aiohttp exception.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import aiohttp

from gateway.config import UpstreamConfig
from gateway.errors import UpstreamError, UpstreamTimeoutError, UpstreamUnavailableError

KEEPALIVE_S = 2.0
"""Idle pooled connections are closed after this long: below uvicorn's default ``timeout_keep_alive`` of 5 s,
which vLLM and SGLang servers run with, so the pool rarely hands out a connection the engine already closed."""


def make_session(config: UpstreamConfig) -> aiohttp.ClientSession:
    """A client session for engine traffic: pooled connections, no total timeout (streams may be long)."""
    connector = aiohttp.TCPConnector(limit=config.max_connections, ttl_dns_cache=300, keepalive_timeout=KEEPALIVE_S)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout_s, sock_read=config.read_timeout_s)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)


@dataclass(slots=True)
class UpstreamResponse:
    """An engine's answer whose headers have arrived; the body is read with :meth:`read` or :meth:`chunks`.

    Always :meth:`close` it (it is idempotent): closing before the end drops the connection, which makes the
    engine abort the request and free its KV cache.
    """

    status: int
    content_type: str
    _resp: aiohttp.ClientResponse

    async def read(self) -> bytes:
        """The whole body.

        Raises:
            UpstreamTimeoutError, UpstreamError: the engine went silent or the connection broke.
        """
        try:
            return await self._resp.read()
        except TimeoutError as exc:
            raise UpstreamTimeoutError("the engine stopped answering") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"the engine connection broke: {exc}") from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, chunk by chunk as it arrives.

        Raises:
            UpstreamTimeoutError, UpstreamError: the engine went silent or the connection broke.
        """
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except TimeoutError as exc:
            raise UpstreamTimeoutError("the engine stopped streaming") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"the engine stream broke: {exc}") from exc

    def close(self) -> None:
        """Release the response; if the body was not read to the end, the connection is closed."""
        if self._resp.content.at_eof():
            self._resp.release()
        else:
            self._resp.close()


async def post_json(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: Mapping[str, str]
) -> UpstreamResponse:
    """POST a JSON body to an engine and wait for the response headers.

    Args:
        session: the engine client session.
        url: full URL of the engine endpoint.
        body: the JSON body, already encoded.
        headers: upstream headers (content type is set here).

    A connection that breaks before the answer's headers (typically a pooled keep-alive connection the engine
    closed) is retried once on a fresh one.

    Raises:
        UpstreamUnavailableError: the engine could not be reached (nothing was processed).
        UpstreamTimeoutError: connecting or waiting for the headers timed out.
        UpstreamError: any other transport failure.
    """
    all_headers = {"Content-Type": "application/json", **headers}
    for attempt in (1, 2):
        try:
            resp = await session.post(url, data=body, headers=all_headers)
            break
        except TimeoutError as exc:
            raise UpstreamTimeoutError(f"timed out waiting for the engine at {url}") from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamUnavailableError(f"engine unreachable: {exc}") from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            # A pooled keep-alive connection the engine closed meanwhile fails like this before any answer: the
            # engine did not take the request (or dropped it with the connection), so one retry on a fresh
            # connection cannot run it twice.
            if attempt == 2:
                raise UpstreamUnavailableError(f"engine connection failed: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"engine request failed: {exc}") from exc
    return UpstreamResponse(resp.status, resp.headers.get("Content-Type", ""), resp)


async def get_text(session: aiohttp.ClientSession, url: str, timeout_s: float, max_bytes: int) -> str:
    """GET a text resource (an engine's ``/metrics``) with a total timeout and a size bound.

    Raises:
        UpstreamTimeoutError: no complete answer within ``timeout_s``.
        UpstreamError: unreachable, non-200, larger than ``max_bytes`` (declared or received: reading stops
            there), cut short (framing), or not decodable as UTF-8.
    """
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                raise UpstreamError(f"GET {url} answered HTTP {resp.status}")
            too_big = UpstreamError(f"GET {url}: body exceeds {max_bytes} bytes")
            if (resp.content_length or 0) > max_bytes:
                raise too_big
            raw = bytearray()
            async for chunk in resp.content.iter_any():
                raw += chunk
                if len(raw) > max_bytes:
                    raise too_big
    except TimeoutError as exc:
        raise UpstreamTimeoutError(f"GET {url} timed out after {timeout_s} s") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"GET {url} failed: {exc}") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UpstreamError(f"GET {url}: body is not UTF-8") from exc
