"""The one seam through which the gateway talks HTTP to engines: :class:`EngineClient`.

One client per gateway owns the pooled connections to every engine; the front door, the metrics scraper and
the health prober all go through it. Built on ``aiohttp``, many times faster than
``httpx.AsyncClient`` at 50 concurrent requests (``bench/results/decisions.md#engine-http-client``; re-measure
with ``bench/upstream_client.py``). Every aiohttp failure is translated here into a
:class:`~gateway.errors.GatewayError`, so nothing outside this module sees an aiohttp exception.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import aiohttp

from gateway.config import UpstreamConfig
from gateway.errors import UpstreamConnectionError, UpstreamError, UpstreamTimeoutError, UpstreamUnavailableError

KEEPALIVE_S = 2.0
"""Idle pooled connections are closed after this long: below uvicorn's default ``timeout_keep_alive`` of 5 s,
which vLLM and SGLang servers run with, so the pool rarely hands out a connection the engine already closed."""


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - asyncio.get_running_loop().time())


@dataclass(slots=True, eq=False)
class UpstreamResponse:
    """An engine's answer whose headers have arrived; the body is read with :meth:`read` or :meth:`next_chunk`.

    Always :meth:`close` it (it is idempotent): closing before the end drops the connection, which makes the
    engine abort the request and free its KV cache.

    Attributes:
        status: HTTP status.
        content_type: the ``Content-Type`` header ("" when absent).
        deadline: event-loop time (``loop.time()``) by which the whole body must have arrived.
    """

    status: int
    content_type: str
    deadline: float
    _resp: aiohttp.ClientResponse
    url: str = ""
    """The URL the request went to."""
    _open: set[UpstreamResponse] | None = None
    """The client's open answers, which this one leaves when closed."""

    async def read(self) -> bytes:
        """The whole body, by :attr:`deadline`.

        Raises:
            UpstreamTimeoutError: the deadline passed.
            UpstreamConnectionError: the connection broke.
        """
        try:
            async with asyncio.timeout(_remaining(self.deadline)):
                return await self._resp.read()
        except TimeoutError as exc:
            raise UpstreamTimeoutError("the engine did not finish its answer in time") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamConnectionError(f"the engine connection broke: {exc}") from exc

    async def next_chunk(self, timeout_s: float) -> bytes:
        """The next chunk of the body as it arrives (``b""`` at its end), waiting at most ``timeout_s`` for it
        and never past :attr:`deadline`.

        Raises:
            UpstreamTimeoutError: no chunk within the timeout, or the deadline passed.
            UpstreamConnectionError: the connection broke.
        """
        remaining = _remaining(self.deadline)
        if remaining <= 0:
            raise UpstreamTimeoutError("the engine did not finish its answer in time")
        content = self._resp.content
        try:
            arrived = content.read_nowait()  # what is in already, without a timer: under load, most chunks
        except aiohttp.ClientError as exc:
            raise UpstreamConnectionError(f"the engine stream broke: {exc}") from exc
        if arrived or content.at_eof():
            return arrived
        late = UpstreamTimeoutError("the engine did not finish its answer in time")
        try:
            async with asyncio.timeout(min(timeout_s, remaining)):
                return await self._resp.content.readany()
        except TimeoutError as exc:
            if remaining <= timeout_s:
                raise late from exc
            raise UpstreamTimeoutError(f"the engine sent nothing for {timeout_s:g} s") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamConnectionError(f"the engine stream broke: {exc}") from exc

    def close(self) -> None:
        """Release the response; if the body was not read to the end, the connection is closed."""
        if self._open is not None:
            self._open.discard(self)
        if self._resp.content.at_eof():
            self._resp.release()
        else:
            self._resp.close()


class EngineClient:
    """HTTP towards the engines: pooled connections (at most ``max_connections``) and a connect timeout.

    The other timeouts depend on the phase of a request (first byte, idle, total; see
    :class:`~gateway.config.UpstreamConfig`) and are applied per call by :meth:`post_json` and
    :class:`UpstreamResponse`. Build it inside a running event loop; :meth:`aclose` it (or use it as an async
    context manager) when done.

    Args:
        config: connection pool size and connect timeout.
    """

    def __init__(self, config: UpstreamConfig) -> None:
        connector = aiohttp.TCPConnector(limit=config.max_connections, ttl_dns_cache=300, keepalive_timeout=KEEPALIVE_S)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout_s, sock_read=None)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)
        self._open: set[UpstreamResponse] = set()
        self._aborted: dict[str, int] = {}
        """Base URLs whose answers are being aborted (:meth:`abort`), with how many aborts are under way."""

    @contextlib.contextmanager
    def abort(self, base_url: str) -> Iterator[int]:
        """Abort every request to ``base_url`` (an engine removed by force): each answer open now is closed, so its
        reader fails with :class:`~gateway.errors.UpstreamError` as if the engine's connection broke (the engine
        aborts the request), and, for as long as the context lasts, an answer whose headers arrive is closed at once
        with :class:`~gateway.errors.UpstreamUnavailableError`. Yields how many open answers were closed."""
        prefix = base_url.rstrip("/") + "/"
        self._aborted[prefix] = self._aborted.get(prefix, 0) + 1
        try:
            closed = [a for a in self._open if a.url.startswith(prefix)]
            for answer in closed:
                answer.close()
            yield len(closed)
        finally:
            left = self._aborted[prefix] - 1
            if left:
                self._aborted[prefix] = left
            else:
                del self._aborted[prefix]

    async def __aenter__(self) -> EngineClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await self._session.close()

    async def post_json(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        headers_timeout_s: float,
        total_timeout_s: float,
    ) -> UpstreamResponse:
        """POST a JSON body to an engine and wait for the response headers (:meth:`send` with ``POST``)."""
        return await self.send(
            "POST", url, body, headers, headers_timeout_s=headers_timeout_s, total_timeout_s=total_timeout_s
        )

    async def send(
        self,
        method: str,
        url: str,
        body: bytes | None,
        headers: Mapping[str, str],
        *,
        headers_timeout_s: float,
        total_timeout_s: float,
    ) -> UpstreamResponse:
        """Send a request (``method``: ``GET``, ``POST``, ``DELETE``; a JSON ``body`` or none) to an engine and
        wait for the response headers.

        Args:
            url: full URL of the engine endpoint.
            body: the JSON body, already encoded (``None``: no body).
            headers: upstream headers (the JSON content type is set here when there is a body).
            headers_timeout_s: longest wait for the response headers, seconds.
            total_timeout_s: the whole answer must have arrived this long after sending, seconds (sets the
                returned response's :attr:`~UpstreamResponse.deadline`).

        A connection that breaks before the answer's headers (typically a pooled keep-alive connection the engine
        closed) is retried once on a fresh one.

        Raises:
            UpstreamUnavailableError: the engine could not be reached (nothing was processed).
            UpstreamTimeoutError: connecting or waiting for the headers timed out.
            UpstreamError: any other transport failure.
        """
        all_headers = {"Content-Type": "application/json", **headers} if body is not None else dict(headers)
        deadline = asyncio.get_running_loop().time() + total_timeout_s
        for attempt in (1, 2):
            try:
                async with asyncio.timeout(min(headers_timeout_s, _remaining(deadline))):
                    resp = await self._session.request(method, url, data=body, headers=all_headers)
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
        if self._aborted and any(url.startswith(prefix) for prefix in self._aborted):
            resp.close()
            raise UpstreamUnavailableError(f"the engine at {url} is being removed")
        answer = UpstreamResponse(resp.status, resp.headers.get("Content-Type", ""), deadline, resp, url, self._open)
        self._open.add(answer)
        return answer

    async def get_text(self, url: str, timeout_s: float, max_bytes: int) -> str:
        """GET a text resource (an engine's ``/metrics``) with a total timeout and a size bound.

        Raises:
            UpstreamTimeoutError: no complete answer within ``timeout_s``.
            UpstreamError: unreachable, non-200, larger than ``max_bytes`` (declared or received: reading stops
                there), cut short (framing), or not decodable as UTF-8.
        """
        # asyncio.timeout, not aiohttp.ClientTimeout(total=...): aiohttp's own timer turns a cancellation of the
        # calling task that lands as the timeout fires into a TimeoutError (aiohttp issue #5979, still open on 3.14;
        # measured: 5% of cancels at random moments against a hung endpoint), so a prober or scraper cancelled
        # at shutdown could carry on and never stop.
        try:
            async with asyncio.timeout(timeout_s), self._session.get(url) as resp:
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
