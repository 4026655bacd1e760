"""How each engine adapter reads its engine's error answers into the OpenAI error shape."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.engines.base import EngineAdapter
from gateway.engines.sglang import SglangAdapter
from gateway.engines.vllm import VllmAdapter


def raw(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def error(message: str, type_: str, code: object, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


OPENAI_SHAPED = raw({"error": {"message": "too long", "type": "BadRequestError", "param": "prompt", "code": 400}})
FLAT = raw({"object": "error", "message": "bad thing", "type": "BadRequestError", "param": None, "code": 400})
DETAIL = raw({"detail": "field required"})
FLAT_AND_OPENAI = raw({"message": "flat", "error": {"message": "inner"}})


@pytest.mark.parametrize(
    ("adapter", "status", "body", "expected"),
    [
        (VllmAdapter(), 400, OPENAI_SHAPED, error("too long", "BadRequestError", 400, "prompt")),
        (SglangAdapter(), 400, OPENAI_SHAPED, error("too long", "BadRequestError", 400, "prompt")),
        (SglangAdapter(), 400, FLAT, error("bad thing", "BadRequestError", 400)),
        (SglangAdapter(), 404, raw({"message": "no such model"}), error("no such model", "not_found_error", 404)),
        (SglangAdapter(), 400, FLAT_AND_OPENAI, error("inner", "invalid_request_error", 400)),
        # the flat shape is SGLang's: from a vLLM engine it is passed on as text
        (VllmAdapter(), 400, raw({"message": "m"}), error('{"message": "m"}', "invalid_request_error", 400)),
        (VllmAdapter(), 422, DETAIL, error("field required", "invalid_request_error", 422)),
        (SglangAdapter(), 422, DETAIL, error("field required", "invalid_request_error", 422)),
        (VllmAdapter(), 500, b"engine exploded\n", error("engine exploded", "upstream_error", 500)),
        (SglangAdapter(), 503, b"", error("engine answered HTTP 503", "upstream_error", 503)),
        (SglangAdapter(), 429, b"[1, 2]", error("[1, 2]", "rate_limit_error", 429)),
    ],
)
def test_engine_errors_are_read_into_the_openai_shape(
    adapter: EngineAdapter, status: int, body: bytes, expected: dict[str, Any]
) -> None:
    assert adapter.normalize_error(status, body) == expected
