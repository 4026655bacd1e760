"""Front-door validation of OpenAI request bodies.

Only what the gateway needs is checked (the JSON shape, ``model``, ``messages``/``prompt``, ``stream``, token
limits); every other field is left as the client sent it and forwarded untouched. Errors are
:class:`~gateway.errors.InvalidRequestError` (HTTP 400) naming the field, in OpenAI's wording where it has one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from gateway.errors import InvalidRequestError

Route = Literal["chat", "completions"]

_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
"""A ``\\uD800``-``\\uDFFF`` escape: legal JSON, but a lone one decodes to a string that cannot be UTF-8 encoded."""


@dataclass(slots=True)
class ParsedRequest:
    """A validated request body.

    Attributes:
        body: the JSON body as a dict (forwarded, after rank pinning, to the engine).
        model: the requested model.
        stream: whether the client asked for a stream.
        max_tokens: the output-token limit the client set, or ``None``.
    """

    body: dict[str, Any]
    model: str
    stream: bool
    max_tokens: int | None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def load_json(raw: bytes) -> Any:
    """``json.loads`` for hostile input: strict JSON (no ``NaN``/``Infinity``), nesting bounded by the recursion
    limit, and strings that can be sent on as UTF-8 (no lone surrogate escapes)."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
        if _SURROGATE_ESCAPE.search(raw):  # rare: check only then (valid pairs, e.g. escaped emoji, are fine)
            json.dumps(body, ensure_ascii=False).encode()
    except (ValueError, UnicodeError) as exc:  # UnicodeDecodeError: invalid UTF-8; UnicodeEncodeError: surrogate
        raise InvalidRequestError(f"could not parse the JSON body of your request: {exc}") from exc
    except RecursionError as exc:
        raise InvalidRequestError("could not parse the JSON body of your request: nested too deeply") from exc
    return body


def parse_request(raw: bytes, route: Route, *, max_tokens_limit: int | None = None) -> ParsedRequest:
    """Parse and validate a ``/v1/chat/completions`` (``route="chat"``) or ``/v1/completions`` body.

    Args:
        raw: the body as received.
        route: which endpoint it was sent to.
        max_tokens_limit: largest ``max_tokens``/``max_completion_tokens`` accepted (``None``: no limit).

    Raises:
        InvalidRequestError: not strict JSON in UTF-8, nested too deeply, not an object, or a field the gateway
            needs is missing, mistyped or out of range.
    """
    body = load_json(raw)
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    model = body.get("model")
    if model is None:
        raise InvalidRequestError("you must provide a model parameter", param="model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("'model' must be a non-empty string", param="model")
    if route == "chat":
        messages = body.get("messages")
        if messages is None:
            raise InvalidRequestError("'messages' is a required property", param="messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("'messages' must be a non-empty array", param="messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InvalidRequestError(
                    f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]"
                )
    else:
        prompt = body.get("prompt")
        if prompt is None:
            raise InvalidRequestError("'prompt' is a required property", param="prompt")
        if not isinstance(prompt, str | list) or (isinstance(prompt, list) and not prompt):
            raise InvalidRequestError(
                "'prompt' must be a string, an array of strings or a non-empty array of token ids",
                param="prompt",
            )
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequestError("'stream' must be a boolean", param="stream")
    max_tokens: int | None = None
    for name in _TOKEN_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise InvalidRequestError(f"'{name}' must be a positive integer", param=name)
        if max_tokens_limit is not None and value > max_tokens_limit:
            raise InvalidRequestError(f"'{name}' must be at most {max_tokens_limit}", param=name)
        max_tokens = value if max_tokens is None else min(max_tokens, value)
    return ParsedRequest(body=body, model=model, stream=stream, max_tokens=max_tokens)
