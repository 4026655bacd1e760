"""The gateway in front of the simulated P/D engines, one protocol at a time: SGLang's bootstrap, vLLM NIXL and vLLM
Mooncake. Requests go through the official ``openai`` client, streamed and not; each is split into its two legs,
pinned on both sides (the mocks' per-rank counters: everything pinned, nothing placed by the engine), its KV
moves from prefill to decode, and nothing is left running or holding KV on either pool afterwards."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import httpx
import openai
import pytest

from gateway.config import EngineConfig, HealthConfig, Settings
from gateway.server.app import create_app
from gateway.serving import serve_in_background
from gateway.sim.calibration import EngineModelConfig
from gateway.sim.mock_engine.app import MockEngineConfig, create_mock_engine_app
from tests.helpers import total

MODEL = "deepseek-v3"
FAST = 1000.0
DP = 2
REQUESTS = 6
MESSAGES = [{"role": "user", "content": "Tell me about disaggregated serving."}]


@dataclass
class Setup:
    gateway: str
    prefill: str
    decode: str


@contextlib.asynccontextmanager
async def pd_stack(protocol: str) -> AsyncIterator[Setup]:
    """A gateway (its defaults: sbs on the prefill leg, the decode allocation on the decode leg) before a prefill
    mock and a decode mock of ``DP`` ranks each speaking ``protocol``."""
    flavor = "sglang" if protocol == "sglang" else "vllm"
    connector: dict[str, Any] = {} if protocol == "sglang" else {"kv_connector": protocol}
    prefill_model = replace(EngineModelConfig(), kv_lease_s=1e6)  # never expires while a test runs
    prefill = MockEngineConfig(flavor, DP, MODEL, speed=FAST, role="prefill", engine_model=prefill_model, **connector)
    decode = MockEngineConfig(flavor, DP, MODEL, speed=FAST, role="decode", **connector)
    async with (
        serve_in_background(create_mock_engine_app(prefill)) as prefill_url,
        serve_in_background(create_mock_engine_app(decode)) as decode_url,
    ):
        port = int(prefill_url.rsplit(":", 1)[1])
        bootstrap = {} if protocol == "nixl" else {"bootstrap_host": "127.0.0.1", "bootstrap_port": port}
        common: dict[str, Any] = {"flavor": flavor, "dp_size": DP, "models": [MODEL], **connector}
        settings = Settings(
            engines=[
                EngineConfig(name="p", url=prefill_url, role="prefill", **common, **bootstrap),
                EngineConfig(name="d", url=decode_url, role="decode", **common),
            ],
            health=HealthConfig(probe_interval_s=60),
        )
        async with serve_in_background(create_app(settings)) as gateway_url:
            yield Setup(gateway_url, prefill_url, decode_url)


async def ask(client: openai.AsyncOpenAI, stream: bool) -> tuple[str, int]:
    """One chat request; its text and completion tokens."""
    if not stream:
        done = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16)  # type: ignore[arg-type]
        assert done.usage is not None
        return done.choices[0].message.content or "", done.usage.completion_tokens
    parts, tokens = [], 0
    async for chunk in await client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    ):
        parts += [c.delta.content or "" for c in chunk.choices]
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return "".join(parts), tokens


async def settled(
    http: httpx.AsyncClient, setup: Setup, prefill_held: int = 0
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both mocks' counters once nothing runs on either and the prefill holds the KV of ``prefill_held`` requests
    (bounded polling)."""
    for _ in range(500):
        p = (await http.get(f"{setup.prefill}/_sim/requests")).json()
        d = (await http.get(f"{setup.decode}/_sim/requests")).json()
        if not any(p["running"] + d["running"] + d["held"]) and sum(p["held"]) == prefill_held:
            return p, d
        await asyncio.sleep(0.01)
    raise AssertionError(f"still running: prefill {p}, decode {d}")


@pytest.mark.parametrize("protocol", ["sglang", "nixl", "mooncake"])
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "assembled"])
async def test_requests_are_split_pinned_and_answered_by_decode(protocol: str, stream: bool) -> None:
    async with (
        pd_stack(protocol) as setup,
        httpx.AsyncClient(timeout=30) as http,
        openai.AsyncOpenAI(base_url=f"{setup.gateway}/v1", api_key="none", max_retries=0) as client,
    ):
        answers = await asyncio.gather(*(ask(client, stream) for _ in range(REQUESTS)))
        p, d = await settled(http, setup)
    for text, tokens in answers:
        assert text and 0 < tokens <= 16
    assert sum(p["pinned"]) == REQUESTS and sum(p["placed"]) == 0
    assert sum(d["pinned"]) == REQUESTS and sum(d["placed"]) == 0
    assert all(p["pinned"]) and all(d["pinned"])  # both ranks of each pool took work
    assert sum(d["transfers_completed"]) == REQUESTS and sum(d["transfers_failed"]) == 0


@pytest.mark.parametrize("protocol", ["sglang", "nixl", "mooncake"])
@pytest.mark.parametrize(
    ("pool", "fault"),
    [("decode", "transfer_fail"), ("prefill", "http_500"), ("decode", "http_500")],
    ids=["transfer-breaks", "prefill-fails", "decode-fails"],
)
async def test_a_failed_leg_or_transfer_is_retried_and_leaves_nothing_behind(protocol: str, pool: str, fault: str):
    async with (
        pd_stack(protocol) as setup,
        httpx.AsyncClient(timeout=30) as http,
        openai.AsyncOpenAI(base_url=f"{setup.gateway}/v1", api_key="none", max_retries=0) as client,
    ):
        # a running system: every rank has answered before (a rank that never has is shut out at its first failure)
        await asyncio.gather(*(ask(client, False) for _ in range(4 * DP)))
        engine = setup.prefill if pool == "prefill" else setup.decode
        plan = await http.put(f"{engine}/_sim/faults", json={"generate": fault, "remaining": 2})
        assert plan.status_code == 200
        answers = await asyncio.gather(*(ask(client, stream) for stream in [True, False] * (REQUESTS // 2)))
        injected = (await http.get(f"{engine}/_sim/faults")).json()["injected"]
        # a vLLM prefill (NIXL and Mooncake) is not told that its decode failed before or while pulling: it holds
        # those blocks until their lease expires (NIXL's 30 s, Mooncake's 480 s abort timeout); an SGLang prefill
        # leg is cancelled by the gateway and frees them
        held = 2 if protocol != "sglang" and pool == "decode" else 0
        _, d = await settled(http, setup, held)
        metrics = (await http.get(f"{setup.gateway}/metrics")).text
    assert injected == {fault: 2}
    assert all(text and tokens for text, tokens in answers)  # every request answered, none lost
    assert sum(d["transfers_completed"]) == REQUESTS + 4 * DP
    assert total(metrics, "gateway_pd_leg_failures_total") == 2
    assert total(metrics, "gateway_upstream_retries_total") == 2
