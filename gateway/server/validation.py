"""Front-door validation of OpenAI request bodies.

Only what the gateway needs is checked (the JSON shape, ``model``, ``messages``/``prompt``, ``stream``, token
limits); every other field is left as the client sent it and forwarded untouched. Errors are
:class:`~gateway.errors.InvalidRequestError` (HTTP 400) naming the field, in OpenAI's wording where it has one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from gateway.errors import InvalidRequestError

Route = Literal["chat", "completions"]

_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")


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


def parse_request(raw: bytes, route: Route) -> ParsedRequest:
    """Parse and validate a ``/v1/chat/completions`` (``route="chat"``) or ``/v1/completions`` body.

    Raises:
        InvalidRequestError: not JSON, not an object, or a field the gateway needs is missing or mistyped.
    """
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"could not parse the JSON body of your request: {exc}") from exc
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
        max_tokens = value if max_tokens is None else min(max_tokens, value)
    return ParsedRequest(body=body, model=model, stream=stream, max_tokens=max_tokens)
