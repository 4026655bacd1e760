"""Errors of the gateway, and their rendering as OpenAI-style error bodies.

Hierarchy::

    GatewayError                      status, type, code; rendered as {"error": {...}}
    ├── AuthenticationError   401     missing or wrong API key (code ``invalid_api_key``)
    ├── InvalidRequestError   400     malformed JSON, wrong types, missing fields
    │   └── PayloadTooLargeError 413  the body exceeds ``max_body_bytes``
    ├── ModelNotFoundError    404     no engine serves the model
    ├── ResponseNotFoundError 404     the gateway does not know (or no longer has) the engine of a stored Response
    ├── NotImplementedForModelError 501  the endpoint cannot serve this model (Responses on P/D engines)
    ├── RateLimitedError      429     the tenant's requests or tokens a minute are used up; carries Retry-After
    ├── NoCapacityError       503     no engine rank is usable for the model; carries Retry-After
    ├── OverloadedError       503     window full or queueing deadline passed; carries Retry-After
    └── UpstreamError         502     an engine failed: a stream that ended or broke    (blame: rank)
        ├── UpstreamConnectionError  502  the connection broke in the middle of an answer (blame: engine)
        ├── UpstreamUnavailableError 503  connection refused / reset before any byte     (blame: engine)
        ├── UpstreamTimeoutError     504  the engine did not answer in time              (blame: rank)
        └── UpstreamStatusError      5xx  the engine answered HTTP 5xx; its own body     (blame: rank)

    ClientDisconnected                    the client went away first: nothing is answered (not a GatewayError)

Errors are translated at the boundary (``raise ... from exc``) and rendered in one place,
:func:`error_body`, so every error a client sees has the same shape:
``{"error": {"message": str, "type": str, "param": str | None, "code": str | int | None}}``.

A failed try at an engine (an :class:`UpstreamError`) counts against a circuit breaker, the engine's or the DP
rank's (its class's ``blame``), and in ``gateway_upstream_failures_total`` under its class's ``failure_kind``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from gateway.types import FailureScope


class GatewayError(Exception):
    """Base of every error the gateway answers with.

    Attributes:
        status: HTTP status code.
        type: OpenAI error ``type``.
        param: the request field at fault, if any.
        code: OpenAI error ``code``.
        retryable: whether sending the same request elsewhere may succeed.
        retry_after_s: when set, answers carry ``Retry-After`` with it (seconds).
    """

    status = 500
    type = "internal_error"
    code: str | int | None = None
    retryable = False
    retry_after_s: int | None = None

    def __init__(self, message: str, *, param: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if status is not None:
            self.status = status

    def body(self) -> dict[str, Any]:
        """The OpenAI-style error body."""
        return error_body(self.message, self.type, param=self.param, code=self.code)


class AuthenticationError(GatewayError):
    """The request carries no API key, or a wrong one (HTTP 401; OpenAI's type and code for it)."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class InvalidRequestError(GatewayError):
    """The client's request is malformed (HTTP 400)."""

    status = 400
    type = "invalid_request_error"


class PayloadTooLargeError(InvalidRequestError):
    """The request body is larger than the configured limit (HTTP 413)."""

    status = 413
    code = "payload_too_large"


class ModelNotFoundError(GatewayError):
    """No configured engine serves the requested model (HTTP 404)."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class ResponseNotFoundError(GatewayError):
    """A stored Response whose engine the gateway does not know: never produced through this front door, forgotten
    (``responses.ttl_s``, ``responses.max_remembered``), or its engine is no longer configured (HTTP 404)."""

    status = 404
    type = "invalid_request_error"
    code = "response_not_found"


class NotImplementedForModelError(GatewayError):
    """The endpoint cannot serve the requested model (HTTP 501): the Responses API on a model served by P/D
    engines."""

    status = 501
    type = "invalid_request_error"
    code = "not_implemented"


class RateLimitedError(GatewayError):
    """The tenant's rate limit is used up (HTTP 429), with ``Retry-After``: whole seconds until its bucket holds
    enough again. As OpenAI answers it: code ``rate_limit_exceeded``, type the limit (``requests`` or ``tokens``).

    Attributes:
        limit: which limit: ``requests`` or ``tokens`` (a minute).
        retry_after_s: seconds the client should wait before retrying.
    """

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, limit: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.limit = self.type = limit
        self.retry_after_s = retry_after_s


class NoCapacityError(GatewayError):
    """No engine rank is usable for the request right now (HTTP 503)."""

    status = 503
    type = "service_unavailable"
    code = "no_capacity"
    retryable = True
    retry_after_s = 1


class OverloadedError(GatewayError):
    """The gateway is overloaded (HTTP 503 with ``Retry-After``): its window is full (code ``window_full``), or
    the request waited past its queueing deadline (code ``queue_timeout``). Answered at once, never a hang.

    Attributes:
        retry_after_s: seconds the client should wait before retrying.
    """

    status = 503
    type = "overloaded_error"
    code = "window_full"
    retryable = True

    def __init__(self, message: str, *, retry_after_s: int = 1, code: str | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        if code is not None:
            self.code = code


class UpstreamError(GatewayError):
    """An engine failed, or answered with an error that is passed on to the client.

    Attributes:
        failure_kind: the ``kind`` label of ``gateway_upstream_failures_total`` a failed try counts under.
        blame: the circuit breaker a failed try counts against: the whole engine's or only the DP rank's.
    """

    status = 502
    type = "upstream_error"
    failure_kind = "stream_broken"
    blame: FailureScope = "rank"


class UpstreamConnectionError(UpstreamError):
    """The engine's connection broke in the middle of an answer (HTTP 502; ``failure_kind`` ``stream_broken``
    like any broken stream).

    Blamed on the engine, not the DP rank: both engines serve every DP rank of an instance from one HTTP server,
    and a failure inside one request's generation comes back in the stream as an error event followed by
    ``data: [DONE]`` on a connection that stays whole (vLLM ``entrypoints/openai/serving_chat.py`` catches any
    exception of its stream generator this way; SGLang ``entrypoints/openai/serving_chat.py`` does so for a
    scheduler's abort and a ``ValueError``), so a connection that breaks mid-answer is that server failing. An
    engine that dies under many answers therefore opens its own breaker after ``health.failure_threshold`` of
    them, and its further broken answers are one fault already known (they take no retry token), where every DP
    rank would otherwise count its own.
    """

    failure_kind = "stream_broken"
    blame: FailureScope = "engine"


class UpstreamUnavailableError(UpstreamError):
    """The engine could not be reached before any byte of the answer (HTTP 503)."""

    status = 503
    type = "service_unavailable"
    code = "engine_unavailable"
    retryable = True
    failure_kind = "unavailable"
    blame: FailureScope = "engine"


class UpstreamTimeoutError(UpstreamError):
    """The engine did not answer within the configured timeout (HTTP 504)."""

    status = 504
    type = "timeout"
    code = "engine_timeout"
    failure_kind = "timeout"


class UpstreamStatusError(UpstreamError):
    """The engine answered HTTP 5xx. Nothing reached the client, so the request may be sent elsewhere; when it
    is not, the engine's own error (``engine_body``, already in OpenAI shape) is the answer, with its status.
    """

    failure_kind = "http_5xx"

    def __init__(self, status: int, engine_body: dict[str, Any]) -> None:
        super().__init__(f"the engine answered HTTP {status}", status=status)
        self.engine_body = engine_body

    def body(self) -> dict[str, Any]:
        return self.engine_body


class ClientDisconnected(Exception):
    """The client closed its connection before its answer was ready; nothing is sent back."""


def error_body(message: str, type_: str, *, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    """Render an OpenAI-style error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def engine_error_type(status: int) -> str:
    """The OpenAI error ``type`` for an engine's HTTP error ``status`` when its body names none."""
    return _STATUS_TYPES.get(status, "upstream_error")


def json_object(raw: bytes) -> dict[str, Any] | None:
    """``raw`` parsed as a JSON object, or ``None`` when it is empty, not JSON, or not an object."""
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def openai_error_fields(parsed: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The inner ``error`` object of an OpenAI-shaped error body ``{"error": {"message", ...}}``, else ``None``."""
    inner = parsed.get("error")
    return inner if isinstance(inner, dict) and "message" in inner else None


def engine_error_body(status: int, fields: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI-style error body from an engine's error ``fields`` (``message`` required; ``type``,
    ``param`` and ``code`` optional, the type then following ``status`` and the code being ``status``)."""
    return error_body(
        str(fields["message"]),
        str(fields.get("type") or engine_error_type(status)),
        param=fields.get("param"),
        code=fields.get("code", status),
    )


def normalize_engine_error(status: int, raw: bytes) -> dict[str, Any]:
    """Turn an engine's error answer into an OpenAI-style error body (the shapes every engine may send).

    An OpenAI-shaped ``{"error": {...}}`` (vLLM's) is kept as is; FastAPI's own validation errors
    ``{"detail": ...}`` take its text; anything else is wrapped with its text. Shapes particular to one engine
    flavour are read by its adapter first (:meth:`gateway.engines.base.EngineAdapter.normalize_error`).

    Args:
        status: the engine's HTTP status.
        raw: the engine's response body.
    """
    parsed = json_object(raw)
    if parsed is not None:
        fields = openai_error_fields(parsed)
        if fields is not None:
            return engine_error_body(status, fields)
        if "detail" in parsed:
            return error_body(str(parsed["detail"]), engine_error_type(status), code=status)
    text = raw.decode("utf-8", "replace").strip()[:500] or f"engine answered HTTP {status}"
    return error_body(text, engine_error_type(status), code=status)
