"""The outermost ASGI middleware: request id, log context, access log, and a last-resort 500.

For every HTTP request it

- takes the client's ``X-Request-Id`` if it is safe (:func:`gateway.logs.clean_request_id`), else generates one,
  and makes it the current :class:`~gateway.logs.RequestLog` (a contextvar) so every log line, and the
  upstream request, carry it;
- sets ``X-Request-Id`` on the response, whatever answers it (a route, a 401 from the key check, a 404 for an
  unknown path, a 500), replacing any other value;
- turns an exception that escapes the app before the response started into an OpenAI-style 500 (logged with
  its traceback), so even a bug answers in the documented shape;
- writes one ``gateway.access`` log line when the answer is over (see :mod:`gateway.logs`).

Plain ASGI, not Starlette's ``BaseHTTPMiddleware``: that one hides client disconnects from the app.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import GatewayError
from gateway.logs import (
    ACCESS_FIELDS,
    ACCESS_LOGGER,
    CONTEXT_FIELDS,
    RequestLog,
    clean_request_id,
    end_request,
    start_request,
)

log = logging.getLogger(__name__)
access_log = logging.getLogger(ACCESS_LOGGER)

_ID_HEADER = b"x-request-id"
MAX_LOGGED_PATH_CHARS = 512
"""Longest URL path written to the access log, characters (the rest is cut and marked with ``...``)."""
_UNPRINTABLE = re.compile(rb"[^\x21-\x7e]")


def loggable_path(scope: Scope) -> str:
    """The request's path as sent (percent-encoded, so a decoded ``%0A`` cannot split a log line), with any
    other character outside printable ASCII percent-encoded too, cut at :data:`MAX_LOGGED_PATH_CHARS`."""
    raw = scope.get("raw_path") or str(scope.get("path", "")).encode("utf-8", "surrogateescape")
    if len(raw) <= MAX_LOGGED_PATH_CHARS and not _UNPRINTABLE.search(raw):
        return str(raw.decode("ascii"))
    path = "".join(chr(b) if 0x21 <= b <= 0x7E else f"%{b:02X}" for b in raw[: MAX_LOGGED_PATH_CHARS + 1])
    return path if len(path) <= MAX_LOGGED_PATH_CHARS else path[:MAX_LOGGED_PATH_CHARS] + "..."


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:  # ASGI header names are lowercase
            return str(value.decode("latin-1"))
    return None


class RequestContextMiddleware:
    """See the module docstring.

    Args:
        app: the wrapped ASGI app.
        access_log_enabled: write the per-request access-log line.
        clock: monotonic clock in seconds (for ``e2e_s``).
    """

    def __init__(
        self, app: ASGIApp, *, access_log_enabled: bool = True, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.app = app
        self.access_log_enabled = access_log_enabled
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        entry = RequestLog(
            clean_request_id(_header(scope, _ID_HEADER)), method=scope["method"], path=loggable_path(scope)
        )
        token = start_request(entry)
        started_at = self.clock()
        id_header = (_ID_HEADER, entry.request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                entry.status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != _ID_HEADER]
                message = {**message, "headers": [*headers, id_header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if entry.status is not None:
                raise
            log.exception("unhandled error while serving %s %s", entry.method, entry.path)
            body = json.dumps(GatewayError("internal error in the gateway").body()).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send_with_id({"type": "http.response.start", "status": 500, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        finally:
            entry.e2e_s = self.clock() - started_at
            if self.access_log_enabled:
                access_log.info(
                    "%s %s %s",
                    entry.method,
                    entry.path,
                    entry.status,
                    extra=entry.fields(CONTEXT_FIELDS + ACCESS_FIELDS),
                )
            end_request(token)
