"""External load balancing: two single-rank vLLM servers, configured as two engines and routed by URL."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import openai
import pytest

from scripts.real_vllm import Server, running
from tests.real_vllm.support import engine_config, gateway, moved, scrape, series

pytestmark = pytest.mark.real_vllm

FIXED = {"ignore_eos": True}
MODEL = "tiny"
"""Random weights: vLLM's own batching and metrics, meaningless text, about 10x faster than SmolLM2."""


@pytest.fixture(scope="module")
def pair(vllm_installed: None) -> Iterator[list[Server]]:
    with running(MODEL, count=2, max_num_seqs=4) as servers:
        yield servers


@pytest.mark.parametrize("policy", ["sbs", "round_robin"])
async def test_two_single_rank_servers_each_serve_what_the_gateway_sent_them(pair: list[Server], policy: str) -> None:
    before = [series(await scrape(s.url), "vllm:request_success_total") for s in pair]
    engines = [engine_config(f"e{i}", s) for i, s in enumerate(pair)]
    async with gateway(policy, *engines) as url, openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused") as client:

        async def one(i: int) -> list[int]:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "y" * (40 * (i + 1))}],
                max_tokens=8,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=FIXED,
            )
            return [c.usage.completion_tokens async for c in stream if c.usage is not None]

        assert await asyncio.gather(*(one(i) for i in range(10))) == [[8]] * 10
        text = await scrape(url)
    placed = series(text, "gateway_dispatched_requests_total")
    served = {}
    for i, server in enumerate(pair):
        served[f"e{i}"] = sum(moved(before[i], series(await scrape(server.url), "vllm:request_success_total")).values())
    assert sum(placed.values()) == 10 and all(placed.values()), f"expected both engines used, placed {placed}"
    assert served == placed, f"engines served {served}, gateway placed {placed}"
