"""JSON schemas of the OpenAI request bodies, for the gateway's OpenAPI document (``/openapi.json``).

The routes read their bodies themselves (:mod:`gateway.server.validation`, faster than a pydantic model and
forwarding unknown fields untouched), so FastAPI cannot infer these; they are declared here so that clients,
docs and API fuzzers (schemathesis, hypothesis-jsonschema) know what to send. They describe the fields the
gateway checks and the common OpenAI ones; any other field is allowed and forwarded to the engine as sent.
"""

from __future__ import annotations

from typing import Any

_TOKENS = {"type": "integer", "minimum": 1, "description": "Output-token limit (the gateway caps it)."}
_COMMON: dict[str, Any] = {
    "model": {"type": "string", "minLength": 1, "description": "A model from GET /v1/models."},
    "stream": {"type": "boolean", "default": False},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "max_tokens": _TOKENS,
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "n": {"type": "integer", "minimum": 1},
    "seed": {"type": "integer"},
    "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
}
_CONTENT_PART = {
    "type": "object",
    "required": ["type"],
    "properties": {"type": {"type": "string"}, "text": {"type": "string"}},
}

CHAT_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        **_COMMON,
        "max_completion_tokens": _TOKENS,
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role"],
                "properties": {
                    "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
                    "content": {
                        "anyOf": [{"type": "string"}, {"type": "array", "items": _CONTENT_PART}, {"type": "null"}]
                    },
                    "name": {"type": "string"},
                },
            },
        },
    },
    "additionalProperties": True,
}
"""``POST /v1/chat/completions`` body."""

COMPLETION_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {
        **_COMMON,
        "prompt": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "minItems": 1, "items": {"type": "string"}},
                {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
            ]
        },
    },
    "additionalProperties": True,
}
"""``POST /v1/completions`` body."""


def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose required JSON request body follows ``schema``."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
