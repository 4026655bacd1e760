"""The gateway reads a P/D decode engine's queues: requests waiting for their KV to be reserved and requests
receiving it, as the simulated decode engine reports them (SGLang: ``/metrics`` and ``GET /v1/loads``; vLLM:
``vllm:num_requests_kv_fetch_by_stage``), counted once in the rank's running requests whatever the gateway itself
sent there, and exported per rank (``gateway_rank_decode_queue_requests``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import httpx
import openai
import pytest

from gateway.config import EngineConfig, HealthConfig, ScrapeConfig, Settings
from gateway.server.app import create_app
from gateway.serving import serve_in_background
from gateway.sim.calibration import EngineModelConfig
from gateway.sim.mock_engine.app import MockEngineConfig, create_mock_engine_app
from gateway.telemetry import sum_samples

MODEL = "deepseek-v3"
SLOW = 1e-4
"""Speed of the prefill mock: no prefill finishes while a test runs, so the decode side waits for the KV."""
DECODE_KV_TOKENS = 2400
"""The decode rank's KV: one request of 2,000 output tokens reserves its KV, a second waits for room."""
POLLS, POLL_S = 400, 0.02


@dataclass
class Setup:
    gateway: str
    decode: str


@contextlib.asynccontextmanager
async def pd_stack(protocol: str) -> AsyncIterator[Setup]:
    """A gateway scraping every 50 ms before a slow prefill mock and a decode mock with little KV, one DP rank each,
    speaking ``protocol``."""
    flavor = "sglang" if protocol == "sglang" else "vllm"
    connector: dict[str, Any] = {} if protocol == "sglang" else {"kv_connector": protocol}
    prefill_model = replace(EngineModelConfig(), kv_lease_s=1e6)
    decode_model = replace(EngineModelConfig(), kv_capacity_tokens=DECODE_KV_TOKENS)
    prefill = MockEngineConfig(flavor, 1, MODEL, speed=SLOW, role="prefill", engine_model=prefill_model, **connector)
    decode = MockEngineConfig(flavor, 1, MODEL, speed=1.0, role="decode", engine_model=decode_model, **connector)
    async with (
        serve_in_background(create_mock_engine_app(prefill)) as prefill_url,
        serve_in_background(create_mock_engine_app(decode)) as decode_url,
    ):
        port = int(prefill_url.rsplit(":", 1)[1])
        common: dict[str, Any] = {"flavor": flavor, "dp_size": 1, "models": [MODEL], **connector}
        settings = Settings(
            engines=[
                EngineConfig(
                    name="p", url=prefill_url, role="prefill", bootstrap_host="127.0.0.1", bootstrap_port=port, **common
                ),
                EngineConfig(name="d", url=decode_url, role="decode", **common),
            ],
            health=HealthConfig(probe_interval_s=60),
            scrape=ScrapeConfig(interval_s=0.05, timeout_s=1.0),
        )
        async with serve_in_background(create_app(settings)) as gateway_url:
            yield Setup(gateway_url, decode_url)


def decode_rank(text: str) -> tuple[float, float, float]:
    """``(running, pre-allocating, in transfer)`` of the decode rank in the gateway's ``/metrics``."""
    labels = {"engine": "d", "rank": "0"}
    return (
        sum_samples(text, "gateway_rank_running", **labels),
        sum_samples(text, "gateway_rank_decode_queue_requests", queue="prealloc", **labels),
        sum_samples(text, "gateway_rank_decode_queue_requests", queue="transfer", **labels),
    )


@pytest.mark.parametrize(
    ("protocol", "queued"),
    [
        # SGLang reserves a request's prompt and output (DECODE_KV_TOKENS holds one), vLLM its prompt's blocks only
        ("sglang", (1.0, 1.0)),
        ("mooncake", (0.0, 2.0)),
    ],
)
async def test_the_gateway_sees_the_decode_queues_once(protocol: str, queued: tuple[float, float]) -> None:
    async with (
        pd_stack(protocol) as setup,
        httpx.AsyncClient(timeout=30) as http,
        openai.AsyncOpenAI(base_url=f"{setup.gateway}/v1", api_key="none", max_retries=0) as client,
    ):
        asks = [
            asyncio.ensure_future(
                client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"Request {i} about disaggregated serving."}],
                    max_tokens=2000,
                    extra_body={"ignore_eos": True},
                )
            )
            for i in range(2)
        ]
        seen = (0.0, 0.0, 0.0)
        for _ in range(POLLS):  # the gateway has scraped the decode engine with both requests queued
            seen = decode_rank((await http.get(f"{setup.gateway}/metrics")).text)
            if seen[1:] == queued:
                break
            await asyncio.sleep(POLL_S)
        engine = (await http.get(f"{setup.decode}/_sim/requests")).json()
        for ask in asks:
            ask.cancel()
        await asyncio.gather(*asks, return_exceptions=True)
    assert seen == (2.0, *queued)  # the engine reports both of the gateway's legs: not counted twice
    assert engine["running"] == [2]  # the mock: running, waiting and both queues
