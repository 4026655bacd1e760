"""Malformed requests get a clear OpenAI-style 4xx and disturb nothing: a table of the known cases, then fuzzing
(schemathesis over the gateway's own OpenAPI schema, hypothesis over hostile bytes and JSON) against a gateway
with simulated engines, asserting no 5xx and a gateway that still serves normal requests afterwards.

The fuzzing is deterministic (``derandomize=True``, no example database) and bounded (``max_examples``)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import EngineConfig, Settings
from gateway.server.app import create_app
from tests.helpers import MODEL, gateway_before, running_cluster

MAX_TOKENS_LIMIT = 64
"""The fuzzed gateway's ``max_tokens_limit``: bounds the work a valid fuzzed request gives the engines."""

CHAT_OK = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize(
    ("path", "payload", "status", "param"),
    [
        ("/v1/chat/completions", b"{not json", 400, None),
        ("/v1/chat/completions", b"[1, 2]", 400, None),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}]}', 400, "model"),
        ("/v1/chat/completions", b'{"model": 5, "messages": []}', 400, "model"),
        ("/v1/chat/completions", b'{"model": "m"}', 400, "messages"),
        ("/v1/chat/completions", b'{"model": "m", "messages": []}', 400, "messages"),
        ("/v1/chat/completions", b'{"model": "m", "messages": ["hi"]}', 400, "messages[0]"),
        ("/v1/completions", b'{"model": "m"}', 400, "prompt"),
        ("/v1/completions", b'{"model": "m", "prompt": 3}', 400, "prompt"),
        ("/v1/completions", b'{"model": "m", "prompt": "x", "stream": "yes"}', 400, "stream"),
        ("/v1/completions", b'{"model": "m", "prompt": "x", "max_tokens": -1}', 400, "max_tokens"),
        ("/v1/completions", b'{"model": "m", "prompt": "x", "max_tokens": true}', 400, "max_tokens"),
        ("/v1/completions", b'{"model": "gpt-9", "prompt": "x"}', 404, "model"),
        ("/v1/chat/completions", b"", 400, None),
        ("/v1/chat/completions", b"null", 400, None),
        ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None),
        ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user"}], "temperature": NaN}', 400, None),
        ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user"}], "top_p": -Infinity}', 400, None),
        ("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, 400, None),
        ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}', 400, None),
        ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": 1}]}', 400, "messages[0]"),
        ("/v1/chat/completions", b'{"model": "m", "messages": {"role": "user"}}', 400, "messages"),
        ("/v1/chat/completions", b'{"model": ["m"], "messages": [{"role": "user"}]}', 400, "model"),
        ("/v1/chat/completions", b'{"model": "", "messages": [{"role": "user"}]}', 400, "model"),
        ("/v1/completions", b'{"model": "m", "prompt": []}', 400, "prompt"),
        ("/v1/completions", b'{"model": "m", "prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
        ("/v1/completions", b'{"model": "m", "prompt": "x", "max_tokens": 1.5}', 400, "max_tokens"),
        ("/v1/completions", b'{"model": "m", "prompt": "x", "max_tokens": "10"}', 400, "max_tokens"),
        ("/v1/completions", b'{"model": "m", "prompt": "x", "max_tokens": 1e400}', 400, "max_tokens"),
        ("/v1/completions", b'{"model": "m", "prompt": "x", "max_tokens": 10000000000000}', 400, "max_tokens"),
        ("/v1/completions", b'{"model": "m", "prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", 400, None),
        ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user"}], "max_completion_tokens": -3}', 400,
         "max_completion_tokens"),
    ],
)  # fmt: skip
async def test_malformed_requests_get_an_openai_error(
    path: str, payload: bytes, status: int, param: str | None
) -> None:
    async with gateway_before("vllm") as client:
        r = await client.post(path, content=payload, headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert error["param"] == param and error["message"], error
        ok = await client.post("/v1/completions", json={"model": "m", "prompt": "x"})
        assert ok.status_code == 200, ok.text


async def test_escaped_surrogate_pairs_are_fine() -> None:
    """``json.dumps`` (ensure_ascii) escapes an emoji as a surrogate pair: valid, and forwarded as the emoji."""
    async with gateway_before("vllm") as client:
        payload = json.dumps({"model": "m", "prompt": "smile \U0001f600"}).encode()
        assert b"\\ud83d\\ude00" in payload
        r = await client.post("/v1/completions", content=payload, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["echo_body"]["prompt"] == "smile \U0001f600"


async def test_the_openapi_schema_describes_the_request_bodies() -> None:
    async with gateway_before("vllm") as client:
        spec = (await client.get("/openapi.json")).json()
    for path, required in (("/v1/chat/completions", ["model", "messages"]), ("/v1/completions", ["model", "prompt"])):
        body = spec["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        schema = body["content"]["application/json"]["schema"]
        assert schema["required"] == required and schema["properties"]["max_tokens"]["minimum"] == 1


# Fuzzing.


@pytest.fixture(scope="module")
def fuzzed_gateway() -> Iterator[str]:
    """Simulated engines (SGLang and vLLM flavours) behind a gateway, served from a thread's event loop so that
    the synchronous fuzzers can call it; stopped at the end of the module."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    found: dict[str, Any] = {}

    async def serve() -> None:
        found["stop"] = asyncio.Event()
        try:
            async with running_cluster("sbs", speed=200.0, dp_size=2, max_tokens_limit=MAX_TOKENS_LIMIT) as cluster:
                found["url"] = cluster.gateway_url
                ready.set()
                await found["stop"].wait()
        finally:
            ready.set()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), name="fuzzed-gateway")
    thread.start()
    try:
        assert ready.wait(60) and "url" in found, "the gateway did not start"
        yield found["url"]
    finally:
        loop.call_soon_threadsafe(found["stop"].set)
        thread.join(60)
        loop.close()


def assert_answered_cleanly(r: httpx.Response | Any, what: str) -> None:
    assert r.status_code < 500, f"{what} -> {r.status_code}: {r.text[:500]}"
    if r.status_code >= 400 and r.request.method != "HEAD":
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, f"{what} -> {r.text[:500]}"


_PLACEHOLDER = EngineConfig(name="e", flavor="vllm", url="http://127.0.0.1:9", models=[MODEL])
SCHEMA = schemathesis.openapi.from_dict(create_app(Settings(engines=[_PLACEHOLDER])).openapi())


@SCHEMA.parametrize()
@settings(max_examples=30, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
def test_schemathesis_finds_no_server_error(case: Any, fuzzed_gateway: str) -> None:
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = MODEL  # a served model, so that schema-valid bodies reach the engines
    response = case.call(base_url=fuzzed_gateway, timeout=30)
    assert_answered_cleanly(response, f"{case.method} {case.path} body={case.body!r:.300}")


ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=20) | st.sampled_from(["\ud800", "a\udfff"])
"""Text including lone surrogates (which JSON can escape but UTF-8 cannot carry)."""
JSON_LEAVES = st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT
HOSTILE_JSON = st.recursive(
    JSON_LEAVES,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
TOKENS = st.integers(1, MAX_TOKENS_LIMIT)
VALID_BODIES = {
    "/v1/chat/completions": st.fixed_dictionaries(
        {
            "model": st.just(MODEL),
            "messages": st.lists(
                st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": ANY_TEXT}),
                min_size=1,
                max_size=3,
            ),
        },
        optional={"max_tokens": TOKENS, "max_completion_tokens": TOKENS, "stream": st.booleans()},
    ),
    "/v1/completions": st.fixed_dictionaries(
        {"model": st.just(MODEL), "prompt": ANY_TEXT | st.lists(st.integers(0, 50_000), min_size=1, max_size=5)},
        optional={"max_tokens": TOKENS, "stream": st.booleans()},
    ),
}
FIELDS = ["model", "messages", "prompt", "stream", "max_tokens", "max_completion_tokens", "routed_dp_rank", "n"]


def one_field_off(valid: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """A valid body with one field (maybe one the gateway never looks at) replaced by a hostile value."""
    return st.tuples(valid, st.sampled_from(FIELDS), HOSTILE_JSON).map(lambda t: {**t[0], t[1]: t[2]})


def encoded(bodies: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return bodies.map(lambda v: json.dumps(v).encode())  # ensure_ascii: a lone surrogate becomes a \ud8xx escape


REQUESTS = st.one_of(
    *(st.tuples(st.just(path), encoded(valid) | encoded(one_field_off(valid))) for path, valid in VALID_BODIES.items()),
    st.tuples(st.sampled_from(list(VALID_BODIES)), st.binary(max_size=200) | encoded(HOSTILE_JSON)),
)


@given(request=REQUESTS)
@settings(max_examples=200, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
def test_hostile_bodies_find_no_server_error(request: tuple[str, bytes], fuzzed_gateway: str) -> None:
    path, body = request
    with httpx.Client(base_url=fuzzed_gateway, timeout=30) as client:
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert_answered_cleanly(r, f"POST {path} {body[:300]!r}")


def test_after_the_fuzzing_the_gateway_still_serves(fuzzed_gateway: str) -> None:
    with httpx.Client(base_url=fuzzed_gateway, timeout=30) as client:
        assert client.get("/ready").status_code == 200
        r = client.post("/v1/chat/completions", json=CHAT_OK)
        assert r.status_code == 200 and r.json()["choices"], r.text
        with client.stream("POST", "/v1/chat/completions", json={**CHAT_OK, "stream": True}) as s:
            assert [line for line in s.iter_lines() if line][-1] == "data: [DONE]"
        metrics = client.get("/metrics").text
    assert "gateway_inflight_requests 0.0" in metrics
