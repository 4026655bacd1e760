"""Front-door behaviour against echoing fake engines: forwarding, pinning, errors, metrics."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from gateway.sim.cluster import free_port
from tests.helpers import CHAT, ECHO_MODEL, gateway_before

MODEL = ECHO_MODEL


async def test_unknown_fields_are_forwarded_untouched_and_sglang_rank_is_pinned_in_body() -> None:
    async with gateway_before("sglang") as client:
        sent = {**CHAT, "temperature": 0.3, "vendor_ext": {"nested": [1, "two", None]}, "data_parallel_rank": 99}
        r = await client.post("/v1/chat/completions", json=sent, headers={"X-Request-Id": "req-123"})
    assert r.status_code == 200, r.text
    echoed = r.json()["echo_body"]
    assert echoed["vendor_ext"] == {"nested": [1, "two", None]}
    assert echoed["temperature"] == 0.3 and echoed["messages"] == CHAT["messages"]
    assert "data_parallel_rank" not in echoed  # the client cannot choose the rank
    assert echoed["routed_dp_rank"] in range(4)
    assert r.json()["echo_headers"]["x-request-id"] == "req-123"
    assert r.headers["x-request-id"] == "req-123"


async def test_vllm_rank_is_pinned_by_header_and_client_headers_do_not_leak() -> None:
    async with gateway_before("vllm") as client:
        ranks = []
        for _ in range(4):
            r = await client.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": "x"},
                headers={"X-data-parallel-rank": "7", "X-Secret": "s"},
            )
            assert r.status_code == 200, r.text
            headers = r.json()["echo_headers"]
            assert "x-secret" not in headers
            assert "routed_dp_rank" not in r.json()["echo_body"]
            ranks.append(int(headers["x-data-parallel-rank"]))
    assert sorted(ranks) == [0, 1, 2, 3]


async def test_stream_is_relayed_event_by_event() -> None:
    async with (
        gateway_before("vllm", policy="sbs") as client,
        client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in r.aiter_lines() if line]
    assert lines == ['data: {"i": 0}', 'data: {"i": 1}', 'data: {"i": 2}', "data: [DONE]"]


async def test_engine_dying_mid_stream_gives_an_error_event_and_done() -> None:
    async with (
        gateway_before("vllm") as client,
        client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True, "fail": "mid-stream"}) as r,
    ):
        lines = [line async for line in r.aiter_lines() if line]
    assert lines[:3] == ['data: {"i": 0}', 'data: {"i": 1}', 'data: {"i": 2}']
    assert json.loads(lines[3].removeprefix("data: "))["error"]["type"] == "upstream_error"
    assert lines[4] == "data: [DONE]"


@pytest.mark.parametrize(
    ("flavor", "fail", "status", "message"),
    [("sglang", "sglang-flat", 400, "bad thing"), ("vllm", "500", 500, "engine exploded")],
)
async def test_engine_errors_are_passed_on_in_openai_shape(flavor: str, fail: str, status: int, message: str) -> None:
    async with gateway_before(flavor) as client:
        r = await client.post("/v1/chat/completions", json={**CHAT, "fail": fail})
    assert r.status_code == status
    assert r.json()["error"]["message"] == message


async def test_unreachable_engine_is_a_503_and_not_ready() -> None:
    async with gateway_before("vllm", url=f"http://127.0.0.1:{free_port()}") as client:
        r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "no_capacity"  # the first health probe already took it out
        assert r.headers["retry-after"] == "1"
        ready = await client.get("/ready")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        assert ready.json()["engines"]["e"]["state"] == "open"
        assert (await client.get("/health")).status_code == 200


async def test_models_health_ready_metrics_and_unknown_routes() -> None:
    async with gateway_before("sglang", policy="sbs") as client:
        models = (await client.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == [MODEL]
        ready = (await client.get("/ready")).json()
        assert ready["ready"] is True and ready["draining"] is False
        assert ready["engines"] == {"e": {"state": "closed", "unhealthy_ranks": [], "up": True, "scrape_ok": True}}
        await client.post("/v1/chat/completions", json=CHAT)
        await client.post("/v1/chat/completions", json={"model": "nope", "messages": CHAT["messages"]})
        missing = await client.get("/v2/nothing")
        assert missing.status_code == 404 and "error" in missing.json()
        text = (await client.get("/metrics")).text
    for name in (
        'gateway_requests_total{model="m",route="chat",status="200"} 1.0',
        'gateway_requests_total{model="unknown",route="chat",status="404"} 1.0',
        "gateway_ttft_seconds_bucket",
        "gateway_e2e_latency_seconds_bucket",
        "gateway_window_wait_seconds_bucket",
        "gateway_window_batch_size_bucket",
        'gateway_dispatched_requests_total{engine="e"',
        'gateway_dispatched_prompt_tokens_total{engine="e"',
        'gateway_scrapes_total{engine="e",result="ok"}',
        'gateway_rank_running{engine="e",rank="3"}',
        'gateway_rank_drain_seconds{engine="e",rank="3"}',
        'gateway_step_model_seconds{engine="e",term="c"}',
        'gateway_step_model_timed_steps{engine="e"}',
        "gateway_window_interval_seconds",
        'gateway_window_closed_at_once_total{reason="idle"} 1.0',  # the one request served found it idle
        'gateway_engine_prefill_aligned{engine="e"} 0.0',
    ):
        assert name in text, f"{name!r} missing from /metrics"


class WordTokenizer:
    """A stand-in for a real tokenizer: one token per whitespace-separated word."""

    def count_text(self, text: str) -> int:
        return len(text.split())


async def test_a_plugged_in_tokenizer_counts_prompt_tokens() -> None:
    async with gateway_before("vllm", tokenizer=WordTokenizer()) as client:
        content = "one two three four five six seven"
        r = await client.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": content}]})
        assert r.status_code == 200
        text = (await client.get("/metrics")).text
    total = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("gateway_dispatched_prompt_tokens_total{")
    )
    assert total == 7  # the heuristic would have said 9 (35 characters / 4)


@pytest.mark.parametrize("policy", ["sbs", "round_robin"])
async def test_clients_reusing_a_request_id_do_not_collide(policy: str) -> None:
    async with gateway_before("vllm", policy=policy) as client:
        replies = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "same"}) for _ in range(6))
        )
    assert [r.status_code for r in replies] == [200] * 6
    assert {r.headers["x-request-id"] for r in replies} == {"same"}


@pytest.mark.parametrize("chunked", [False, True])
async def test_an_oversized_body_gets_413_and_the_gateway_carries_on(chunked: bool) -> None:
    big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    async with gateway_before("vllm", max_body_bytes=4096) as client:
        if chunked:  # no Content-Length: the limit is enforced while the body arrives

            async def body() -> AsyncIterator[bytes]:
                for i in range(0, len(big), 1000):
                    yield big[i : i + 1000]

            r = await client.post("/v1/chat/completions", content=body())
        else:
            r = await client.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "payload_too_large"
        ok = await client.post("/v1/chat/completions", json=CHAT)
        assert ok.status_code == 200
