"""The front door's HTTP client towards the scheduler service: aiohttp, one keep-alive connection pool, over TCP or
a Unix socket, every call bounded by ``scheduler_service.deadline_s``.

Every failure (connection refused or reset, the deadline passed, an HTTP status the protocol does not use, a body
that is not JSON) becomes :class:`ServiceUnavailable`: the caller then schedules locally.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import quote

import aiohttp

from gateway.config import SchedulerServiceConfig

_JSON_HEADERS = {"Content-Type": "application/json"}
_FAILURES = (aiohttp.ClientError, OSError, TimeoutError, ValueError)


class ServiceUnavailable(Exception):
    """The scheduler service did not answer in time, or answered with something the protocol does not know."""


class ServiceClient:
    """Calls to one scheduler service.

    Args:
        config: the ``scheduler_service`` settings (its URL and deadline).
    """

    def __init__(self, config: SchedulerServiceConfig) -> None:
        self.config = config
        self.url = config.url
        if config.url.startswith("unix:"):
            self._socket_path: str | None = config.url.removeprefix("unix:")
            self._base = "http://scheduler"
        else:
            self._socket_path = None
            self._base = config.url
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the connection pool (inside the running event loop)."""
        if self._session is None:
            connector: aiohttp.BaseConnector = (
                aiohttp.UnixConnector(path=self._socket_path, limit=0)
                if self._socket_path is not None
                else aiohttp.TCPConnector(limit=0)
            )
            self._session = aiohttp.ClientSession(connector=connector)

    async def aclose(self) -> None:
        """Close the connection pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise ServiceUnavailable("the client is closed")
        return self._session

    async def place(self, body: dict[str, Any], wait_s: float) -> dict[str, Any]:
        """``POST /v1/place``: the service's answer (a placement or an error body).

        Args:
            body: ``{"request": ...}``.
            wait_s: how long the answer may take after its headers arrived (the request's remaining queue budget
                when the service holds requests in a window; 0 for an immediate policy), seconds.

        Raises:
            ServiceUnavailable: no headers within the deadline, no body within ``wait_s`` more, a failed
                connection, an unexpected status or a body that is not a JSON object.
        """
        session = self._open()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.config.deadline_s) as timer:
                async with session.post(
                    self._base + "/v1/place", data=json.dumps(body), headers=_JSON_HEADERS
                ) as response:
                    if response.status != 200:
                        raise ServiceUnavailable(f"the scheduler service answered HTTP {response.status}")
                    if wait_s > 0:
                        timer.reschedule(loop.time() + wait_s + self.config.deadline_s)
                    answer = json.loads(await response.read())
        except _FAILURES as exc:
            raise ServiceUnavailable(_describe(exc, self.config.deadline_s)) from exc
        if not isinstance(answer, dict):
            raise ServiceUnavailable("the scheduler service answered a placement with something else")
        return answer

    async def post_events(self, epoch: str, events: list[Any], front_door: str | None = None) -> str | None:
        """``POST /v1/events``: deliver a batch (from ``front_door``, the sender's id); return ``None``, or the
        service's epoch when it refused the batch as meant for an earlier run of the service (HTTP 409).

        Raises:
            ServiceUnavailable: as :meth:`place`.
        """
        session = self._open()
        payload = json.dumps({"epoch": epoch, "events": events, "front_door": front_door})
        try:
            async with asyncio.timeout(self.config.deadline_s):
                async with session.post(self._base + "/v1/events", data=payload, headers=_JSON_HEADERS) as response:
                    if response.status == 409:
                        return str(json.loads(await response.read())["epoch"])
                    if response.status != 204:
                        raise ServiceUnavailable(f"the scheduler service answered events with HTTP {response.status}")
                    return None
        except (*_FAILURES, KeyError, TypeError) as exc:
            raise ServiceUnavailable(_describe(exc, self.config.deadline_s)) from exc

    async def remember_response(self, response_id: str, home: dict[str, Any]) -> None:
        """``PUT /v1/responses/{response_id}``: share where a stored Response lives (``{"engine", "rank",
        "model"}``).

        Raises:
            ServiceUnavailable: as :meth:`place`.
        """
        session = self._open()
        url = f"{self._base}/v1/responses/{quote(response_id, safe='')}"
        try:
            async with asyncio.timeout(self.config.deadline_s):
                async with session.put(url, data=json.dumps(home), headers=_JSON_HEADERS) as response:
                    if response.status != 204:
                        raise ServiceUnavailable(f"the scheduler service answered HTTP {response.status}")
        except _FAILURES as exc:
            raise ServiceUnavailable(_describe(exc, self.config.deadline_s)) from exc

    async def response_home(self, response_id: str) -> dict[str, Any] | None:
        """``GET /v1/responses/{response_id}``: where a stored Response lives, or ``None`` when the service does
        not know it.

        Raises:
            ServiceUnavailable: as :meth:`place`.
        """
        session = self._open()
        url = f"{self._base}/v1/responses/{quote(response_id, safe='')}"
        try:
            async with asyncio.timeout(self.config.deadline_s):
                async with session.get(url) as response:
                    if response.status == 404:
                        return None
                    if response.status != 200:
                        raise ServiceUnavailable(f"the scheduler service answered HTTP {response.status}")
                    answer = json.loads(await response.read())
        except _FAILURES as exc:
            raise ServiceUnavailable(_describe(exc, self.config.deadline_s)) from exc
        if not isinstance(answer, dict):
            raise ServiceUnavailable("the scheduler service answered a response's home with something else")
        return answer

    async def health(self, front_door: str | None = None) -> str:
        """``GET /v1/health``: the service's epoch; with ``front_door`` (the caller's id) it is that front door's
        heartbeat too.

        Raises:
            ServiceUnavailable: as :meth:`place`.
        """
        session = self._open()
        params = None if front_door is None else {"front_door": front_door}
        try:
            async with asyncio.timeout(self.config.deadline_s):
                async with session.get(self._base + "/v1/health", params=params) as response:
                    if response.status != 200:
                        raise ServiceUnavailable(f"the scheduler service's health answered HTTP {response.status}")
                    return str(json.loads(await response.read())["epoch"])
        except (*_FAILURES, KeyError, TypeError) as exc:
            raise ServiceUnavailable(_describe(exc, self.config.deadline_s)) from exc


def _describe(exc: BaseException, deadline_s: float) -> str:
    if isinstance(exc, ServiceUnavailable):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return f"no answer within {deadline_s * 1000:g} ms"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
