"""vLLM-flavoured P/D mock engines over the MooncakeConnector protocol: the prefill's bootstrap /query, the legs built
with gateway.pd.vllm_mooncake and sent concurrently."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import httpx
import pytest

from gateway.pd import DecodeSide, PrefillSide
from gateway.pd.vllm_mooncake import MooncakeAttempt, attempt, parse_query
from gateway.serving import serve_in_background
from gateway.sim.calibration import EngineModelConfig
from gateway.sim.mock_engine.app import MockEngineConfig, create_mock_engine_app
from gateway.sim.mock_engine.protocol import natural_length

MODEL = "deepseek-v3"
FAST = 1000.0
PREFILL_DP, DECODE_DP = 4, 2
SHORT_TIMEOUT_S = 0.5
LONG_TIMEOUT_S = 60.0  # the pull timeout of the tests not of a timeout: a slow machine does not make a pull time out
POLLS, POLL_S = 500, 0.01


@dataclass
class Pair:
    prefill: str
    decode: str
    port: int
    client: httpx.AsyncClient

    async def seen(self, url: str) -> dict[str, Any]:
        result: dict[str, Any] = (await self.client.get(f"{url}/_sim/requests")).json()
        return result

    async def settled(self) -> tuple[dict[str, Any], dict[str, Any]]:
        for _ in range(POLLS):
            p, d = await self.seen(self.prefill), await self.seen(self.decode)
            if not any(p["running"] + p["held"] + d["running"] + d["held"]):
                return p, d
            await asyncio.sleep(POLL_S)
        raise AssertionError(f"still running: prefill {p}, decode {d}")

    async def plan(self, body: dict[str, Any], p: int, d: int) -> MooncakeAttempt:
        engine_ids = parse_query((await self.client.get(f"{self.prefill}/query")).text)
        return attempt(body, PrefillSide("p", p, PREFILL_DP, "127.0.0.1", self.port), DecodeSide("d", d), engine_ids)

    async def send_both(self, plan: MooncakeAttempt, decode_first: bool = False) -> tuple[httpx.Response, ...]:
        decode_leg = plan.decode()
        legs = [
            (f"{self.prefill}/v1/chat/completions", plan.prefill.body, plan.prefill.headers),
            (f"{self.decode}/v1/chat/completions", decode_leg.body, decode_leg.headers),
        ]
        if decode_first:
            legs.reverse()
        answers = await asyncio.gather(*(self.client.post(u, json=b, headers=h) for u, b, h in legs))
        return tuple(reversed(answers)) if decode_first else tuple(answers)


@asynccontextmanager
async def mooncake_pair(timeout_s: float = LONG_TIMEOUT_S, prefill_speed: float = FAST) -> AsyncIterator[Pair]:
    prefill = create_mock_engine_app(
        MockEngineConfig(
            "vllm",
            PREFILL_DP,
            speed=prefill_speed,
            role="prefill",
            kv_connector="mooncake",
            engine_id="moon",
            engine_model=replace(EngineModelConfig(), kv_lease_s=1e6),
        )
    )
    decode = create_mock_engine_app(
        MockEngineConfig("vllm", DECODE_DP, speed=FAST, role="decode", kv_connector="mooncake", pd_timeout_s=timeout_s)
    )
    async with AsyncExitStack() as stack:
        prefill_url = await stack.enter_async_context(serve_in_background(prefill))
        decode_url = await stack.enter_async_context(serve_in_background(decode))
        client = await stack.enter_async_context(httpx.AsyncClient(timeout=30.0))
        yield Pair(prefill_url, decode_url, int(prefill_url.rsplit(":", 1)[1]), client)


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about Mooncake"}], **extra}


async def test_query_lists_every_rank() -> None:
    async with mooncake_pair() as pair:
        query = (await pair.client.get(f"{pair.prefill}/query")).json()
        address = pair.prefill.removeprefix("http://")
        assert query == {
            str(r): {"engine_id": f"moon_dp{r}", "worker_addr": {"0": {"0": address}}} for r in range(PREFILL_DP)
        }


@pytest.mark.parametrize(("decode_first", "stream"), [(False, False), (True, False), (False, True)])
async def test_answer_comes_from_decode_ranks_pinned_kv_freed(decode_first: bool, stream: bool) -> None:
    body = chat_body(max_tokens=100, stream=stream)
    expected = min(100, natural_length(body, 0))
    async with mooncake_pair() as pair:
        plan = await pair.plan(body, 2, 1)
        prefill, decode = await pair.send_both(plan, decode_first)
        assert (prefill.status_code, decode.status_code) == (200, 200)
        assert "kv_transfer_params" not in prefill.json()
        if stream:
            events = [e.removeprefix("data: ") for e in decode.text.split("\n\n") if e]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
            assert text == " tok" * expected
        else:
            assert decode.json()["usage"]["completion_tokens"] == expected
        p, d = await pair.settled()
        assert p["pinned"] == [0, 0, 1, 0] and d["pinned"] == [0, 1]
        assert p["transfers_completed"] == [0, 0, 1, 0] and d["transfers_completed"] == [0, 1]
        assert p["kv_used_tokens"] == [0] * PREFILL_DP and d["kv_used_tokens"] == [0] * DECODE_DP


async def test_decode_without_its_prefill_times_out() -> None:
    async with mooncake_pair(SHORT_TIMEOUT_S) as pair:
        plan = await pair.plan(chat_body(max_tokens=10), 0, 0)
        leg = plan.decode()
        answer = await pair.client.post(f"{pair.decode}/v1/chat/completions", json=leg.body, headers=leg.headers)
        assert answer.status_code == 500
        assert answer.json()["error"]["type"] == "InternalServerError"
        _, d = await pair.settled()
        assert d["transfers_failed"] == [1, 0] and d["kv_used_tokens"] == [0, 0]


async def test_unknown_engine_id_fails_the_decode() -> None:
    async with mooncake_pair() as pair:
        plan = await pair.plan(chat_body(max_tokens=10), 1, 1)
        leg = plan.decode()
        leg.body["kv_transfer_params"]["remote_engine_id"] = "other_dp1"
        answer = await pair.client.post(f"{pair.decode}/v1/chat/completions", json=leg.body, headers=leg.headers)
        assert answer.status_code == 500
        _, d = await pair.settled()
        assert d["transfers_failed"] == [0, 1]


async def test_prefill_without_transfer_id_runs_whole() -> None:
    async with mooncake_pair() as pair:
        plan = await pair.plan(chat_body(max_tokens=10), 1, 1)
        del plan.prefill.body["kv_transfer_params"]["transfer_id"]
        answer = await pair.client.post(
            f"{pair.prefill}/v1/chat/completions", json=plan.prefill.body, headers=plan.prefill.headers
        )
        assert answer.status_code == 200
        p, _ = await pair.settled()  # nothing held
        assert p["held"] == [0] * PREFILL_DP


async def test_aborted_prefill_leaves_nothing_and_its_decode_times_out() -> None:
    async with mooncake_pair(SHORT_TIMEOUT_S, prefill_speed=1.0) as pair:  # a 40k-token prompt prefills for about 5 s
        body = {"model": MODEL, "prompt": "word " * 40_000, "max_tokens": 5}
        plan = await pair.plan(body, 3, 0)
        prefill = asyncio.ensure_future(
            pair.client.post(f"{pair.prefill}/v1/completions", json=plan.prefill.body, headers=plan.prefill.headers)
        )
        for _ in range(POLLS):
            if (await pair.seen(pair.prefill))["running"][3] == 1:
                break
            await asyncio.sleep(POLL_S)
        prefill.cancel()
        with pytest.raises(asyncio.CancelledError):
            await prefill
        leg = plan.decode()
        answer = await pair.client.post(f"{pair.decode}/v1/completions", json=leg.body, headers=leg.headers)
        assert answer.status_code == 500  # its pull waited out the (short) abort timeout
        p, d = await pair.settled()
        assert p["transfers_completed"] == [0] * PREFILL_DP and d["transfers_failed"] == [1, 0]
