"""A non-streamed request goes to the engine as a stream and its answer is assembled by the gateway: the same
answer the engine gives non-streamed, for both simulated flavours, chat and completions, ``n`` 1 and 2; the
scheduler sees its first token; usage the client did not ask for never reaches it; a broken stream is an error
JSON, never half an answer; a client that leaves aborts the engine's request."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, StreamingResponse

from gateway.config import EngineFlavor, HealthConfig, ScrapeConfig, Settings, UpstreamConfig
from gateway.server.app import create_app
from gateway.server.state import GatewayState
from gateway.serving import serve_in_background
from gateway.sim.cluster import SimulatedEngine, simulated_engines
from tests.helpers import CHAT as ECHO_CHAT
from tests.helpers import ECHO_MODEL, MODEL, eventually, total
from tests.helpers import gateway_before as echo_gateway

FLAVORS: list[EngineFlavor] = ["sglang", "vllm"]
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": 40}
COMPLETION = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 300}
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@dataclass
class Setup:
    """A gateway in front of one simulated engine, and what its dispatcher was told."""

    gateway_url: str
    engine_url: str
    app: FastAPI
    progress: list[tuple[str, str]]
    """``(report, request key)`` for every ``first_token``, ``tokens`` and ``finish`` the dispatcher got."""

    @property
    def state(self) -> GatewayState:
        state = self.app.state.gateway
        assert isinstance(state, GatewayState)
        return state


def _record_progress(state: GatewayState, log: list[tuple[str, str]]) -> None:
    dispatcher = state.dispatcher
    first_token, tokens, finish = dispatcher.first_token, dispatcher.tokens, dispatcher.finish

    def on_first_token(request_id: str, engine: str) -> None:
        log.append(("first_token", request_id))
        first_token(request_id, engine)

    def on_tokens(request_id: str, engine: str, n: int) -> None:
        log.append(("tokens", request_id))
        tokens(request_id, engine, n)

    def on_finish(request_id: str) -> None:
        log.append(("finish", request_id))
        finish(request_id)

    dispatcher.first_token, dispatcher.tokens, dispatcher.finish = on_first_token, on_tokens, on_finish  # type: ignore[method-assign]


@contextlib.asynccontextmanager
async def gateway_before(flavor: EngineFlavor, speed: float = 50.0, **settings: Any) -> AsyncIterator[Setup]:
    async with simulated_engines([SimulatedEngine("e", flavor, 2, MODEL)], speed) as engines:
        built = Settings(
            policy="round_robin", engines=engines, scrape=ScrapeConfig(interval_s=0.1, timeout_s=1.0), **settings
        )
        app = create_app(built)
        async with serve_in_background(app) as url:
            progress: list[tuple[str, str]] = []
            _record_progress(app.state.gateway, progress)
            yield Setup(url, engines[0].url, app, progress)


def _meaning(answer: dict[str, Any]) -> dict[str, Any]:
    """An answer without the fields two answers to the same request legitimately differ in."""
    return {k: v for k, v in answer.items() if k not in ("id", "created")}


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("route", ["chat", "completions"])
@pytest.mark.parametrize("flavor", FLAVORS)
async def test_the_assembled_answer_is_what_the_engine_answers_non_streamed(
    flavor: EngineFlavor, route: str, n: int
) -> None:
    body = {**(CHAT if route == "chat" else COMPLETION), "n": n}
    async with gateway_before(flavor) as setup, httpx.AsyncClient(timeout=30) as http:
        via_gateway = await http.post(setup.gateway_url + PATHS[route], json=body)
        direct = await http.post(setup.engine_url + PATHS[route], json=body)
        metrics = (await http.get(setup.gateway_url + "/metrics")).text
    assert via_gateway.status_code == direct.status_code == 200, via_gateway.text
    assert via_gateway.headers["content-type"] == "application/json"
    assembled, expected = via_gateway.json(), direct.json()
    assert _meaning(assembled) == _meaning(expected)
    assert len(assembled["choices"]) == n and assembled["id"].startswith("chatcmpl-" if route == "chat" else "cmpl-")
    # the scheduler saw the request's first token, then its tokens, then its end
    reports = [report for report, _ in setup.progress]
    assert reports[0] == "first_token" and reports[-1] == "finish" and "tokens" in reports, reports
    # and the engine's prompt-token count was compared with the gateway's estimate
    assert total(metrics, "gateway_prompt_tokens_estimate_ratio_count", model=MODEL) == 1


LOGPROBS = {"chat": {"logprobs": True, "top_logprobs": 2}, "completions": {"logprobs": 2}}


@pytest.mark.parametrize("route", ["chat", "completions"])
@pytest.mark.parametrize("flavor", FLAVORS)
async def test_logprobs_of_every_choice_are_assembled_as_the_engine_sends_them(
    flavor: EngineFlavor, route: str
) -> None:
    body = {**(CHAT if route == "chat" else COMPLETION), "n": 2, "max_tokens": 12, **LOGPROBS[route]}
    async with gateway_before(flavor) as setup, httpx.AsyncClient(timeout=30) as http:
        via_gateway = await http.post(setup.gateway_url + PATHS[route], json=body)
        direct = await http.post(setup.engine_url + PATHS[route], json=body)
    assert via_gateway.status_code == direct.status_code == 200, via_gateway.text
    assembled = via_gateway.json()
    assert _meaning(assembled) == _meaning(direct.json())
    logprobs = assembled["choices"][1]["logprobs"]
    assert len(logprobs["content" if route == "chat" else "tokens"]) == 12


TOOLS = [
    {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
    for name in ("get_weather", "get_time")
]


def _without_call_ids(answer: dict[str, Any]) -> dict[str, Any]:
    """An answer whose tool calls' ids (random in both engines) are blanked, ``id`` and ``created`` dropped."""
    out = _meaning(answer)
    out["choices"] = [
        {**c, "message": {**c["message"], "tool_calls": [{**t, "id": "-"} for t in c["message"]["tool_calls"]]}}
        for c in answer["choices"]
    ]
    return out


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
@pytest.mark.parametrize("flavor", FLAVORS)
async def test_tool_calls_are_assembled_as_the_engine_sends_them(
    flavor: EngineFlavor, tool_choice: Any, n: int
) -> None:
    body = {**CHAT, "max_tokens": 10, "n": n, "tools": TOOLS, "tool_choice": tool_choice}
    async with gateway_before(flavor) as setup, httpx.AsyncClient(timeout=30) as http:
        via_gateway = await http.post(setup.gateway_url + PATHS["chat"], json=body)
        direct = await http.post(setup.engine_url + PATHS["chat"], json=body)
    assert via_gateway.status_code == direct.status_code == 200, via_gateway.text
    assembled = via_gateway.json()
    assert _without_call_ids(assembled) == _without_call_ids(direct.json())
    calls = [c["message"]["tool_calls"] for c in assembled["choices"]]
    assert len(calls) == n and all(len(c) == 1 and json.loads(c[0]["function"]["arguments"]) for c in calls)
    assert calls[0][0]["function"]["name"] == ("get_weather" if tool_choice == "required" else "get_time")


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_switched_off_the_request_goes_as_sent_and_its_first_token_is_not_seen(flavor: EngineFlavor) -> None:
    upstream = UpstreamConfig(stream_nonstreamed=False)
    async with gateway_before(flavor, upstream=upstream) as setup, httpx.AsyncClient(timeout=30) as http:
        via_gateway = await http.post(setup.gateway_url + PATHS["chat"], json=CHAT)
        direct = await http.post(setup.engine_url + PATHS["chat"], json=CHAT)
        metrics = (await http.get(setup.gateway_url + "/metrics")).text
    assert _meaning(via_gateway.json()) == _meaning(direct.json())
    assert [report for report, _ in setup.progress] == ["finish"]
    assert total(metrics, "gateway_prompt_tokens_estimate_ratio_count", model=MODEL) == 1


async def _events(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> list[str]:
    async with http.stream("POST", url, json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        return [line[5:].strip() async for line in r.aiter_lines() if line.startswith("data:")]


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_a_stream_gets_usage_only_when_its_client_asked(flavor: EngineFlavor) -> None:
    async with gateway_before(flavor) as setup, httpx.AsyncClient(timeout=30) as http:
        url = setup.gateway_url + PATHS["chat"]
        without = await _events(http, url, CHAT)
        direct = await _events(http, setup.engine_url + PATHS["chat"], CHAT)
        asked = await _events(http, url, {**CHAT, "stream_options": {"include_usage": True}})
        metrics = (await http.get(setup.gateway_url + "/metrics")).text
    assert without[-1] == asked[-1] == "[DONE]"
    chunks = [json.loads(e) for e in without[:-1]]
    assert not any("usage" in c for c in chunks), "the client did not ask for usage"
    assert [_meaning(c) for c in chunks] == [_meaning(json.loads(e)) for e in direct[:-1]]
    last = json.loads(asked[-2])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == len(chunks) - 1
    # both streams' prompt tokens were reported
    assert total(metrics, "gateway_prompt_tokens_estimate_ratio_count", model=MODEL) == 2


FAST_HEALTH = HealthConfig(probe_interval_s=0.05, probe_timeout_s=5.0, failure_threshold=5, open_s=0.3)


@pytest.mark.parametrize("fault", ["kill_mid_stream", "end_without_done"])
async def test_a_stream_broken_before_its_end_is_a_502_json_never_half_an_answer(fault: str) -> None:
    upstream = UpstreamConfig(max_attempts=1)
    async with (
        gateway_before("vllm", upstream=upstream, health=FAST_HEALTH) as setup,
        httpx.AsyncClient(timeout=30) as http,
    ):
        plan = {"generate": fault, "after_chunks": 3, "remaining": 1}
        assert (await http.put(setup.engine_url + "/_sim/faults", json=plan)).status_code == 200
        broken = await http.post(setup.gateway_url + PATHS["chat"], json={**CHAT, "ignore_eos": True})
        after = await http.post(setup.gateway_url + PATHS["chat"], json=CHAT)
    assert broken.status_code == 502 and broken.headers["content-type"] == "application/json"
    error = broken.json()["error"]
    assert error["type"] == "upstream_error" and error["message"], error
    assert "choices" not in broken.json()
    assert after.status_code == 200 and after.json()["choices"]


async def test_a_client_that_leaves_aborts_the_engine_request() -> None:
    async with gateway_before("vllm", speed=1.0) as setup, httpx.AsyncClient(timeout=30) as http:
        long = {**CHAT, "max_tokens": 5000, "ignore_eos": True}
        sending = asyncio.ensure_future(http.post(setup.gateway_url + PATHS["chat"], json=long))

        async def started() -> bool:
            return any(report == "first_token" for report, _ in setup.progress)

        await eventually(started)
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending

        async def aborted() -> bool:
            text = (await http.get(setup.engine_url + "/metrics")).text
            return total(text, "vllm:request_success_total", finished_reason="abort") == 1

        await eventually(aborted)
        await eventually(lambda: _finished(setup))
        assert setup.state.view.inflight_count() == 0


async def _finished(setup: Setup) -> bool:
    return bool(setup.progress) and setup.progress[-1][0] == "finish"


def _erring_engine(code: int, tries: list[int]) -> FastAPI:
    """An engine whose stream starts, then carries an error event with ``code`` (as vLLM and SGLang send an
    error after the stream began), then ``[DONE]``; ``tries`` counts the requests."""
    app = FastAPI()

    async def handle() -> StreamingResponse:
        tries.append(1)

        async def events() -> AsyncIterator[bytes]:
            role = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": ECHO_MODEL}
            yield b"data: " + json.dumps({**role, "choices": [{"index": 0, "delta": {"role": "assistant"}}]}).encode()
            error = {"message": "the engine gave up", "type": "EngineError", "param": None, "code": code}
            yield b"\n\ndata: " + json.dumps({"error": error}).encode() + b"\n\ndata: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    app.add_api_route("/v1/chat/completions", handle, methods=["POST"])
    app.add_api_route("/metrics", lambda: PlainTextResponse(""), methods=["GET"])
    app.add_api_route("/health", lambda: PlainTextResponse(""), methods=["GET"])
    return app


@pytest.mark.parametrize(("code", "tries"), [(400, 1), (500, 2)])
async def test_an_engine_error_in_the_stream_is_answered_with_its_status_after_retries_for_5xx(
    code: int, tries: int
) -> None:
    made: list[int] = []
    upstream = UpstreamConfig(max_attempts=2, retry_backoff_s=0.001, retry_backoff_max_s=0.001)
    async with (
        serve_in_background(_erring_engine(code, made)) as url,
        echo_gateway("vllm", url=url, upstream=upstream) as client,
    ):
        r = await client.post("/v1/chat/completions", json=ECHO_CHAT)
    assert r.status_code == code
    assert r.json()["error"]["message"] == "the engine gave up"
    assert len(made) == tries
