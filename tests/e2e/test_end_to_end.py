"""The official openai client against the gateway in front of real uvicorn-served simulated engines."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import MODEL, Cluster, running_cluster, stream_chat

POLICIES = ["sbs", "round_robin"]
FIXED = {"ignore_eos": True}


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples if s.name == name
    ]


@pytest.mark.parametrize("cluster", POLICIES, indirect=True)
async def test_async_client_chat_non_streaming(cluster: Cluster) -> None:
    client = openai.AsyncOpenAI(base_url=cluster.gateway_url + "/v1", api_key="unused")
    reply = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello!"}], max_tokens=7, extra_body=FIXED
    )
    assert reply.object == "chat.completion"
    assert reply.usage is not None and reply.usage.completion_tokens == 7
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length"
    await client.close()


@pytest.mark.parametrize("cluster", POLICIES, indirect=True)
async def test_async_client_chat_streaming_with_usage(cluster: Cluster) -> None:
    client = openai.AsyncOpenAI(base_url=cluster.gateway_url + "/v1", api_key="unused")
    pieces, usage, finish = [], None, None
    for chunk in await stream_chat(client, MODEL, max_tokens=12):
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert len(pieces) == 12
    assert usage is not None and usage.completion_tokens == 12 and usage.prompt_tokens > 0
    assert finish == "length"
    await client.close()


@pytest.mark.parametrize("cluster", POLICIES, indirect=True)
async def test_sync_client_completions_streaming_and_not(cluster: Cluster) -> None:
    def run() -> tuple[int, int]:
        with openai.OpenAI(base_url=cluster.gateway_url + "/v1", api_key="unused") as client:
            whole = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=5, extra_body=FIXED)
            assert whole.usage is not None
            streamed = client.completions.create(
                model=MODEL, prompt="Once upon", max_tokens=6, stream=True, extra_body=FIXED
            )
            n = sum(1 for chunk in streamed if chunk.choices and chunk.choices[0].text)
            return whole.usage.completion_tokens, n

    assert await asyncio.to_thread(run) == (5, 6)


async def test_sync_client_chat_streaming() -> None:
    async with running_cluster("shortest_queue") as cluster:

        def run() -> int:
            with openai.OpenAI(base_url=cluster.gateway_url + "/v1", api_key="unused") as client:
                stream = client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=4,
                    stream=True,
                    extra_body=FIXED,
                )
                return sum(1 for c in stream if c.choices and c.choices[0].delta.content)

        assert await asyncio.to_thread(run) == 4


async def test_first_chunk_arrives_before_the_last_token_is_generated() -> None:
    async with running_cluster("sbs", speed=1.0) as cluster:  # real time: ~25 ms a decode step
        client = openai.AsyncOpenAI(base_url=cluster.gateway_url + "/v1", api_key="unused")
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "go"}], max_tokens=60, stream=True, extra_body=FIXED
        )
        received = 0
        async with httpx.AsyncClient() as http:
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    received += 1
                if received == 1:
                    # the engines are still generating this request
                    running = 0.0
                    for url in cluster.engine_urls.values():
                        text = (await http.get(url + "/metrics")).text
                        running += sum(v for _, v in samples(text, "vllm:num_requests_running"))
                        running += sum(v for _, v in samples(text, "sglang:num_running_reqs"))
                    assert running == 1
        assert received == 60
        await client.close()


async def test_requests_are_spread_over_all_dp_ranks(cluster: Cluster) -> None:
    client = openai.AsyncOpenAI(base_url=cluster.gateway_url + "/v1", api_key="unused")

    async def one(i: int) -> None:
        await client.completions.create(model=MODEL, prompt="x" * (40 * (i + 1)), max_tokens=20, extra_body=FIXED)

    await asyncio.gather(*(one(i) for i in range(24)))
    await client.close()
    async with httpx.AsyncClient() as http:
        gateway_text = (await http.get(cluster.gateway_url + "/metrics")).text
        vllm_text = (await http.get(cluster.engine_urls["vl"] + "/metrics")).text
    dispatched = {
        (lab["engine"], lab["rank"]): v for lab, v in samples(gateway_text, "gateway_dispatched_requests_total")
    }
    expected = {(e, str(r)) for e in ("sg", "vl") for r in range(4)}
    assert set(dispatched) == expected, dispatched
    assert all(v > 0 for v in dispatched.values()), dispatched
    assert sum(dispatched.values()) == 24
    # the vLLM-flavoured engine's own per-rank counters agree that every rank served requests
    finished = {lab["engine"]: 0.0 for lab, _ in samples(vllm_text, "vllm:request_success_total")}
    for lab, v in samples(vllm_text, "vllm:request_success_total"):
        finished[lab["engine"]] += v
    assert sorted(finished) == ["0", "1", "2", "3"]
    assert all(v > 0 for v in finished.values()), finished
