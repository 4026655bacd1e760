"""Errors of the gateway, and their rendering as OpenAI-style error bodies.

Hierarchy::

    GatewayError                      status, type, code; rendered as {"error": {...}}
    ├── AuthenticationError   401     missing or wrong API key (code ``invalid_api_key``)
    ├── InvalidRequestError   400     malformed JSON, wrong types, missing fields
    │   └── PayloadTooLargeError 413  the body exceeds ``max_body_bytes``
    ├── ModelNotFoundError    404     no engine serves the model
    ├── NoCapacityError       503     no engine rank is usable for the model; carries Retry-After
    ├── OverloadedError       503     window full or queueing deadline passed; carries Retry-After
    └── UpstreamError         502/…   an engine failed or answered with an error
        ├── UpstreamUnavailableError 503  connection refused / reset before any byte  (retryable)
        └── UpstreamTimeoutError     504  the engine did not answer in time

Errors are translated at the boundary (``raise ... from exc``) and rendered in one place,
:func:`error_body`, so every error a client sees has the same shape:
``{"error": {"message": str, "type": str, "param": str | None, "code": str | int | None}}``.
"""

from __future__ import annotations

import json
from typing import Any


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
    """An engine failed, or answered with an error that is passed on to the client."""

    status = 502
    type = "upstream_error"


class UpstreamUnavailableError(UpstreamError):
    """The engine could not be reached before any byte of the answer (HTTP 503)."""

    status = 503
    type = "service_unavailable"
    code = "engine_unavailable"
    retryable = True


class UpstreamTimeoutError(UpstreamError):
    """The engine did not answer within the configured timeout (HTTP 504)."""

    status = 504
    type = "timeout"
    code = "engine_timeout"


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


def normalize_engine_error(status: int, raw: bytes) -> dict[str, Any]:
    """Turn an engine's error answer into an OpenAI-style error body.

    vLLM answers ``{"error": {...}}`` (already OpenAI-shaped, kept as is); SGLang's non-streaming errors are
    flat ``{"object": "error", "message", "type", "param", "code"}`` (DESIGN.md §3); FastAPI's own validation
    errors are ``{"detail": ...}``; anything else is wrapped with its text.

    Args:
        status: the engine's HTTP status.
        raw: the engine's response body.
    """
    type_ = _STATUS_TYPES.get(status, "upstream_error")
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        inner = parsed.get("error")
        if isinstance(inner, dict) and "message" in inner:
            return error_body(
                str(inner["message"]),
                str(inner.get("type") or type_),
                param=inner.get("param"),
                code=inner.get("code", status),
            )
        if "message" in parsed:
            return error_body(
                str(parsed["message"]),
                str(parsed.get("type") or type_),
                param=parsed.get("param"),
                code=parsed.get("code", status),
            )
        if "detail" in parsed:
            return error_body(str(parsed["detail"]), type_, code=status)
    text = raw.decode("utf-8", "replace").strip()[:500] or f"engine answered HTTP {status}"
    return error_body(text, type_, code=status)
