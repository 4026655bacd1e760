"""Structured logging: a per-request context carried by a contextvar, JSON or text lines, the access log.

Every log record written while a request is being served carries that request's id and, once known, the
engine, DP rank and window it was placed in (:class:`RequestContextFilter` copies them from the contextvar onto
the record). Two output formats:

- ``json`` (one JSON object a line, python-json-logger): ``timestamp`` (ISO 8601, UTC), ``level``, ``logger``,
  ``message``, then ``request_id``, ``engine``, ``rank``, ``window_id`` and any ``extra`` fields when set;
- ``text`` (for people): ``2026-11-22 01:02:03,456 INFO gateway.access: POST /v1/chat/completions 200
  request_id=... engine=... rank=...``.

One access-log line per request (logger ``gateway.access``, written by
:class:`~gateway.server.request_context.RequestContextMiddleware`) gives method, path, status and timings in
seconds: ``window_wait_s`` (arrival to placement on a rank), ``ttft_s`` (arrival to the first token leaving the
engine), ``e2e_s`` (arrival to the last byte). Request and response bodies, hence prompt text, are never logged;
nor are ``Authorization`` headers or API keys.
"""

from __future__ import annotations

import logging
import sys
import uuid
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any, Literal

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["json", "text"]
"""Log line format: one JSON object a line, or human-readable text."""

REQUEST_ID_HEADER = "X-Request-Id"
"""Header carrying the request id, in from the client, out to the engine and back to the client."""

MAX_REQUEST_ID_CHARS = 128
"""Longest client-supplied request id kept, characters; a longer one is replaced by a generated id."""

ACCESS_LOGGER = "gateway.access"
"""Logger of the one-line-per-request access log."""

CONTEXT_FIELDS = ("request_id", "engine", "rank", "window_id")
"""Fields of :class:`RequestLog` copied onto every log record written while the request is served."""

ACCESS_FIELDS = ("method", "path", "status", "window_wait_s", "ttft_s", "e2e_s")
"""Further fields of the access-log line."""


@dataclass(slots=True)
class RequestLog:
    """What is known of the request being served, filled in as it goes (mutable: handlers annotate it).

    Attributes:
        request_id: the client's valid ``X-Request-Id`` or a generated one (32 hex characters).
        method: HTTP method.
        path: URL path as sent, percent-encoded (no query string).
        status: HTTP status sent, once sent.
        engine: engine the request was placed on.
        rank: DP rank it was placed on.
        window_id: sequence number of the staggered window that placed it (policy ``sbs`` only).
        window_wait_s: seconds from arrival to placement on a rank.
        ttft_s: seconds from arrival to the first token (whole answer, when not streamed).
        e2e_s: seconds from arrival to the end of the answer.
    """

    request_id: str
    method: str = ""
    path: str = ""
    status: int | None = None
    engine: str | None = None
    rank: int | None = None
    window_id: int | None = None
    window_wait_s: float | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None

    def placed(self, engine: str, rank: int, window_wait_s: float) -> None:
        """Record where the request was placed, ``window_wait_s`` seconds after it arrived."""
        self.engine, self.rank, self.window_wait_s = engine, rank, window_wait_s

    def fields(self, names: tuple[str, ...]) -> dict[str, Any]:
        """The named fields that are set (not ``None``), as a dict for ``logging``'s ``extra``."""
        out = {}
        for name in names:
            value = getattr(self, name)
            if value is not None:
                out[name] = round(value, 6) if isinstance(value, float) else value
        return out


_current: ContextVar[RequestLog | None] = ContextVar("gateway_request", default=None)


def current_request() -> RequestLog | None:
    """The request being served in this task (or the task that spawned it), if any."""
    return _current.get()


def start_request(entry: RequestLog) -> Token[RequestLog | None]:
    """Make ``entry`` the current request of this task and of the tasks it spawns from now on.

    Returns:
        The token to give :func:`end_request` when the request is over.
    """
    return _current.set(entry)


def end_request(token: Token[RequestLog | None]) -> None:
    """Restore the context :func:`start_request` replaced."""
    _current.reset(token)


def request_log() -> RequestLog:
    """The current request, or a detached one (with a fresh id) when called outside a request."""
    entry = _current.get()
    return entry if entry is not None else RequestLog(new_request_id())


def new_request_id() -> str:
    """A fresh request id: 32 lowercase hex characters (UUID4)."""
    return uuid.uuid4().hex


def clean_request_id(value: str | None) -> str:
    """The client's request id if it is safe to log and forward, else a generated one.

    Safe means 1 to :data:`MAX_REQUEST_ID_CHARS` printable ASCII characters without spaces (``!`` to ``~``):
    nothing that could split a log line or an HTTP header (no CR/LF) or blow up a log's size.
    """
    if value and len(value) <= MAX_REQUEST_ID_CHARS and all("!" <= ch <= "~" for ch in value):
        return value
    return new_request_id()


class RequestContextFilter(logging.Filter):
    """Copies the current request's :data:`CONTEXT_FIELDS` onto each record (fields already set win)."""

    def filter(self, record: logging.LogRecord) -> bool:
        entry = _current.get()
        if entry is not None and not hasattr(record, "request_id"):  # the access log's line has them already
            for name, value in entry.fields(CONTEXT_FIELDS).items():
                if not hasattr(record, name):
                    setattr(record, name, value)
        return True


class TextFormatter(logging.Formatter):
    """Human-readable lines: ``time LEVEL logger: message key=value ...`` for the known context fields."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [
            f"{name}={getattr(record, name)}"
            for name in (*CONTEXT_FIELDS, *ACCESS_FIELDS)
            if name not in ("method", "path", "status") and getattr(record, name, None) is not None
        ]
        if not extras:
            return line
        head, sep, tail = line.partition("\n")  # keep a traceback below the fields
        return f"{head} {' '.join(extras)}{sep}{tail}"


def json_formatter() -> logging.Formatter:
    """JSON lines: ``timestamp``, ``level``, ``logger``, ``message`` and every extra field of the record (but
    uvicorn's ``color_message``, the same message with terminal colour codes)."""
    return JsonFormatter(
        "{message}{levelname}{name}",
        style="{",
        reserved_attrs=[*RESERVED_ATTRS, "color_message", "taskName"],
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp=True,
        json_ensure_ascii=False,
    )


def make_handler(fmt: LogFormat, stream: Any = None) -> logging.Handler:
    """A stream handler (stderr by default) writing ``fmt`` lines, with the request context filter attached."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(json_formatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestContextFilter())
    return handler


def configure_logging(level: str = "info", fmt: LogFormat = "text") -> None:
    """Send every log record (the gateway's, uvicorn's, aiohttp's) to stderr as ``fmt`` lines at ``level``.

    Replaces the root logger's handlers; uvicorn's loggers are made to propagate to it (run uvicorn with
    ``log_config=None`` so it leaves them alone).
    """
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(make_handler(fmt))
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
