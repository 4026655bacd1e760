"""Request ids (accepted when safe, else generated; on every answer and upstream) and structured logs (JSON or text
lines carrying the request id, engine, rank, window and timings; one access line per request)."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from gateway.logs import (
    MAX_REQUEST_ID_CHARS,
    RequestContextFilter,
    RequestLog,
    TextFormatter,
    clean_request_id,
    end_request,
    start_request,
)
from gateway.server.request_context import RequestContextMiddleware
from tests.helpers import CHAT, captured_logs, gateway_before


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("req-123", True),
        ("a" * MAX_REQUEST_ID_CHARS, True),
        ("!#$%&'*+-.^_`|~:;<>=?@[]{}()/", True),
        ("a" * (MAX_REQUEST_ID_CHARS + 1), False),
        ("", False),
        (None, False),
        ("two words", False),
        ("id\r\nX-Injected: 1", False),
        ("id\nfake log line", False),
        ("tab\tid", False),
        ("caf\u00e9", False),
        ("nul\x00", False),
        ("del\x7f", False),
    ],
)
def test_clean_request_id(sent: str | None, kept: bool) -> None:
    cleaned = clean_request_id(sent)
    if kept:
        assert cleaned == sent
    else:
        assert cleaned != sent and len(cleaned) == 32 and int(cleaned, 16) >= 0


def access_lines(text: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [line for line in lines if line["logger"] == "gateway.access"]


@pytest.mark.parametrize("policy", ["sbs", "round_robin"])
async def test_an_access_line_per_request_with_placement_and_timings(policy: str) -> None:
    with captured_logs() as logs:
        async with gateway_before("vllm", policy=policy) as client:
            r = await client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "req-ok"})
            assert r.status_code == 200, r.text
            async with client.stream(
                "POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers={"X-Request-Id": "req-stream"}
            ) as s:
                assert [line async for line in s.aiter_lines() if line][-1] == "data: [DONE]"
    by_id = {line["request_id"]: line for line in access_lines(logs.getvalue())}
    for request_id in ("req-ok", "req-stream"):
        line = by_id[request_id]
        expected = {"level": "INFO", "method": "POST", "path": "/v1/chat/completions", "status": 200, "engine": "e"}
        assert {k: line.get(k) for k in expected} == expected, line
        assert line["message"] == "POST /v1/chat/completions 200"
        assert line["rank"] in range(4)
        assert 0 <= line["window_wait_s"] <= line["ttft_s"] <= line["e2e_s"], line
        assert line["timestamp"].endswith("+00:00")
        assert ("window_id" in line) == (policy == "sbs"), line
    if policy == "sbs":
        assert by_id["req-ok"]["window_id"] >= 1


async def test_the_request_id_is_on_every_answer_and_upstream() -> None:
    with captured_logs() as logs:
        async with gateway_before("vllm", max_body_bytes=2048) as client:
            ok = await client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "mine"})
            assert ok.headers["x-request-id"] == "mine" == ok.json()["echo_headers"]["x-request-id"]
            bad_id = "x" * 500
            replaced = await client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": bad_id})
            generated = replaced.headers["x-request-id"]
            assert len(generated) == 32 and replaced.json()["echo_headers"]["x-request-id"] == generated
            answers = {
                "400": await client.post("/v1/chat/completions", content=b"{", headers={"X-Request-Id": "e400"}),
                "404": await client.get("/v2/nothing", headers={"X-Request-Id": "e404"}),
                "405": await client.get("/v1/chat/completions", headers={"X-Request-Id": "e405"}),
                "413": await client.post("/v1/completions", content=b"x" * 4096, headers={"X-Request-Id": "e413"}),
                "model": await client.post(
                    "/v1/completions", json={"model": "nope", "prompt": "x"}, headers={"X-Request-Id": "e-model"}
                ),
            }
            no_id = await client.get("/health")
    for name, r in answers.items():
        assert r.status_code >= 400 and "error" in r.json(), name
    assert [r.headers["x-request-id"] for r in answers.values()] == ["e400", "e404", "e405", "e413", "e-model"]
    assert len(no_id.headers["x-request-id"]) == 32
    assert [r.headers.get_list("x-request-id") for r in (ok, answers["400"])] == [["mine"], ["e400"]]  # just once
    logged = {line["request_id"]: line["status"] for line in access_lines(logs.getvalue())}
    assert logged["mine"] == 200 and logged[generated] == 200 and logged["e404"] == 404 and logged["e413"] == 413
    assert bad_id not in logs.getvalue()


async def test_log_lines_written_while_serving_carry_the_request_id() -> None:
    with captured_logs() as logs:
        async with (
            gateway_before("vllm") as client,
            client.stream(
                "POST",
                "/v1/chat/completions",
                json={**CHAT, "stream": True, "fail": "mid-stream"},
                headers={"X-Request-Id": "req-broken"},
            ) as r,
        ):
            [line async for line in r.aiter_lines()]
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    warnings = [line for line in lines if line["logger"] == "gateway.server.proxy" and line["level"] == "WARNING"]
    assert warnings, "no warning about the broken stream"
    assert {(w["request_id"], w["engine"]) for w in warnings} == {("req-broken", "e")}


async def crashing_app(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("bug")


async def test_an_unhandled_error_is_an_openai_500_with_the_request_id() -> None:
    transport = httpx.ASGITransport(app=RequestContextMiddleware(crashing_app))
    with captured_logs() as logs:
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            r = await client.get("/anything", headers={"X-Request-Id": "req-bug"})
    assert r.status_code == 500
    assert r.json()["error"] == {
        "message": "internal error in the gateway",
        "type": "internal_error",
        "param": None,
        "code": None,
    }
    assert r.headers["x-request-id"] == "req-bug"
    error = next(json.loads(line) for line in logs.getvalue().splitlines() if '"ERROR"' in line)
    assert error["request_id"] == "req-bug" and "RuntimeError: bug" in error["exc_info"]


async def test_access_log_can_be_turned_off() -> None:
    with captured_logs() as logs:
        async with gateway_before("vllm", log={"access_log": False}) as client:
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    assert access_lines(logs.getvalue()) == []


def test_text_lines_show_the_context_fields() -> None:
    record = logging.LogRecord("gateway.x", logging.INFO, __file__, 1, "placed %s", ("ok",), None)
    token = start_request(RequestLog("req-9", engine="sg", rank=2, window_id=7))
    try:
        RequestContextFilter().filter(record)
    finally:
        end_request(token)
    line = TextFormatter().format(record)
    assert line.endswith("INFO gateway.x: placed ok request_id=req-9 engine=sg rank=2 window_id=7"), line


@pytest.mark.parametrize(
    ("raw_path", "logged"),
    [
        (b"/v1/chat/completions", "/v1/chat/completions"),
        (b"/v1/%0Afake%20line", "/v1/%0Afake%20line"),
        (b"/v1/caf\xc3\xa9 x", "/v1/caf%C3%A9%20x"),
        (b"/" + b"a" * 600, "/" + "a" * 511 + "..."),
    ],
)
async def test_the_logged_path_cannot_split_a_log_line(raw_path: bytes, logged: str) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    scope = {"type": "http", "method": "GET", "path": raw_path.decode("latin-1"), "raw_path": raw_path, "headers": []}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        pass

    with captured_logs() as logs:
        await RequestContextMiddleware(app)(scope, receive, send)
    (line,) = access_lines(logs.getvalue())
    assert line["path"] == logged and line["message"] == f"GET {logged} 204"
