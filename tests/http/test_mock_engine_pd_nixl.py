"""vLLM-flavoured P/D mock engines over the NixlConnector protocol: a prefill mock and a decode mock in one process,
the legs built with gateway.pd.vllm_nixl and sent by hand, in turn."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.pd import DecodeSide, PrefillSide
from gateway.pd.vllm_nixl import attempt
from gateway.serving import serve_in_background
from gateway.sim.calibration import EngineModelConfig
from gateway.sim.mock_engine.app import MockEngineConfig, create_mock_engine_app
from gateway.sim.mock_engine.protocol import natural_length

MODEL = "deepseek-v3"
FAST = 1000.0
PREFILL_DP, DECODE_DP = 2, 4
POLLS, POLL_S = 500, 0.01


@dataclass
class Pair:
    prefill: str
    decode: str
    client: httpx.AsyncClient

    async def seen(self, url: str) -> dict[str, Any]:
        answer = await self.client.get(f"{url}/_sim/requests")
        result: dict[str, Any] = answer.json()
        return result

    async def settled(self, prefill: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
        """Both mocks' counters once nothing runs on either and, with ``prefill``, the prefill holds no KV."""
        for _ in range(POLLS):
            p, d = await self.seen(self.prefill), await self.seen(self.decode)
            if not any(p["running"] + (p["held"] if prefill else []) + d["running"] + d["held"]):
                return p, d
            await asyncio.sleep(POLL_S)
        raise AssertionError(f"still running: prefill {p}, decode {d}")

    async def prefill_leg(self, body: dict[str, Any], p: int, d: int, request_id: str = "req-1") -> Any:
        plan = attempt(body, PrefillSide("p", p, PREFILL_DP, "127.0.0.1"), DecodeSide("d", d), request_id)
        answer = await self.client.post(
            f"{self.prefill}/v1/chat/completions", json=plan.prefill.body, headers=plan.prefill.headers
        )
        assert answer.status_code == 200
        return plan, answer.json()


@asynccontextmanager
async def nixl_pair(policy: str = "fail", lease_s: float = 1e6, prefill_speed: float = FAST) -> AsyncIterator[Pair]:
    prefill_model = replace(EngineModelConfig(), kv_lease_s=lease_s)
    prefill = create_mock_engine_app(
        MockEngineConfig(
            "vllm", PREFILL_DP, speed=prefill_speed, role="prefill", engine_model=prefill_model, engine_id="eng"
        )
    )
    decode = create_mock_engine_app(
        MockEngineConfig("vllm", DECODE_DP, speed=FAST, role="decode", kv_load_failure_policy=policy)  # type: ignore[arg-type]
    )
    async with AsyncExitStack() as stack:
        prefill_url = await stack.enter_async_context(serve_in_background(prefill))
        decode_url = await stack.enter_async_context(serve_in_background(decode))
        client = await stack.enter_async_context(httpx.AsyncClient(timeout=30.0))
        yield Pair(prefill_url, decode_url, client)


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about NIXL"}], **extra}


def sse_payloads(text: str) -> list[Any]:
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


async def test_prefill_answers_vllm_kv_transfer_params() -> None:
    async with nixl_pair() as pair:
        _, answer = await pair.prefill_leg(chat_body(max_tokens=50), 1, 0)
        params = answer["kv_transfer_params"]
        port = int(pair.prefill.rsplit(":", 1)[1])
        assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
        assert params["remote_engine_id"] == "eng_dp1"
        assert (params["remote_host"], params["remote_port"]) == ("127.0.0.1", port + 1)
        assert params["remote_request_id"].startswith("req-1")
        assert params["tp_size"] == 1 and params["transfer_mode"] == "pull"
        assert len(params["remote_block_ids"]) == 1 and params["remote_block_ids"][0]
        assert answer["usage"]["completion_tokens"] == 1
        p = await pair.seen(pair.prefill)
        assert p["held"] == [0, 1] and p["pinned"] == [0, 1]  # held until the decode side reads it


@pytest.mark.parametrize("stream", [False, True])
async def test_answer_comes_from_decode_ranks_pinned_blocks_freed(stream: bool) -> None:
    body = chat_body(max_tokens=200, stream=stream)
    expected = min(200, natural_length(body, 0))
    async with nixl_pair() as pair:
        plan, prefill_answer = await pair.prefill_leg(body, 1, 3)
        leg = plan.decode(prefill_answer)
        answer = await pair.client.post(f"{pair.decode}/v1/chat/completions", json=leg.body, headers=leg.headers)
        assert answer.status_code == 200
        if stream:
            events = sse_payloads(answer.text)
            assert events[-1] == "[DONE]"
            content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
            assert content == " tok" * expected
        else:
            assert answer.json()["choices"][0]["message"]["content"] == " tok" * expected
            assert answer.json()["usage"]["completion_tokens"] == expected
        p, d = await pair.settled()
        assert p["pinned"] == [0, 1] and d["pinned"] == [0, 0, 0, 1]
        assert p["transfers_completed"] == [0, 1] and d["transfers_completed"] == [0, 0, 0, 1]
        assert p["kv_used_tokens"] == [0, 0] and d["kv_used_tokens"] == [0] * DECODE_DP


@pytest.mark.parametrize("stream", [False, True])
async def test_unknown_blocks_fail_the_decode(stream: bool) -> None:
    async with nixl_pair() as pair:
        plan, prefill_answer = await pair.prefill_leg(chat_body(max_tokens=20), 0, 2)
        prefill_answer["kv_transfer_params"]["remote_request_id"] = "nobody"
        leg = plan.decode(prefill_answer)
        answer = await pair.client.post(
            f"{pair.decode}/v1/chat/completions", json=leg.body | {"stream": stream}, headers=leg.headers
        )
        error = {"message": "Internal server error", "type": "InternalServerError", "param": None, "code": 500}
        if stream:
            assert answer.status_code == 200
            assert sse_payloads(answer.text) == [{"error": error}, "[DONE]"]
        else:
            assert answer.status_code == 500
            assert answer.json() == {"error": error}
        p, d = await pair.settled(prefill=False)
        assert d["transfers_failed"] == [0, 0, 1, 0] and d["kv_used_tokens"] == [0] * DECODE_DP
        assert p["held"] == [1, 0]  # the real blocks stay held until read or their lease expires


async def test_unknown_blocks_recompute_under_that_policy() -> None:
    body = chat_body(max_tokens=20)
    async with nixl_pair(policy="recompute") as pair:
        plan, prefill_answer = await pair.prefill_leg(body, 0, 2)
        prefill_answer["kv_transfer_params"]["remote_engine_id"] = "other_dp0"
        leg = plan.decode(prefill_answer)
        answer = await pair.client.post(f"{pair.decode}/v1/chat/completions", json=leg.body, headers=leg.headers)
        assert answer.status_code == 200
        assert answer.json()["usage"]["completion_tokens"] == min(20, natural_length(body, 0))
        _, d = await pair.settled(prefill=False)
        assert d["transfers_failed"] == [0, 0, 1, 0] and d["transfers_completed"] == [0] * DECODE_DP


async def test_expired_lease_frees_the_blocks_and_fails_the_decode() -> None:
    async with nixl_pair(lease_s=30.0) as pair:  # vLLM's 30 s lease: 30 ms at this speed
        plan, prefill_answer = await pair.prefill_leg(chat_body(max_tokens=20), 1, 0)
        p, _ = await pair.settled()  # the lease expired: nothing held
        assert p["kv_used_tokens"] == [0, 0]
        leg = plan.decode(prefill_answer)
        answer = await pair.client.post(f"{pair.decode}/v1/chat/completions", json=leg.body, headers=leg.headers)
        assert answer.status_code == 500
        p = await pair.seen(pair.prefill)
        assert p["transfers_failed"] == [0, 1] and p["transfers_completed"] == [0, 0]


async def test_request_without_params_runs_whole() -> None:
    body = chat_body(max_tokens=30)
    async with nixl_pair() as pair:
        for url in (pair.prefill, pair.decode):
            answer = await pair.client.post(f"{url}/v1/chat/completions", json=body)
            assert answer.status_code == 200
            assert answer.json()["usage"]["completion_tokens"] == min(30, natural_length(body, 0))
            assert "kv_transfer_params" not in answer.json()
        await pair.settled()


async def test_aborted_prefill_leaves_nothing_and_its_decode_fails_at_once() -> None:
    async with nixl_pair(prefill_speed=1.0) as pair:  # a 40k-token prompt prefills for about 5 s
        body = {"model": MODEL, "prompt": "word " * 40_000, "max_tokens": 5}
        plan = attempt(body, PrefillSide("p", 0, PREFILL_DP, "127.0.0.1"), DecodeSide("d", 1), "req-9")
        prefill = asyncio.ensure_future(
            pair.client.post(f"{pair.prefill}/v1/completions", json=plan.prefill.body, headers=plan.prefill.headers)
        )
        for _ in range(POLLS):
            if (await pair.seen(pair.prefill))["running"][0] == 1:
                break
            await asyncio.sleep(POLL_S)
        prefill.cancel()
        with pytest.raises(asyncio.CancelledError):
            await prefill
        port = int(pair.prefill.rsplit(":", 1)[1])
        stale = {"kv_transfer_params": {"do_remote_prefill": True, "remote_engine_id": "eng_dp0"}}
        stale["kv_transfer_params"] |= {
            "remote_host": "127.0.0.1",
            "remote_port": port,
            "remote_request_id": "req-9-req-1",
        }
        leg = plan.decode(stale)
        answer = await pair.client.post(f"{pair.decode}/v1/completions", json=leg.body, headers=leg.headers)
        assert answer.status_code == 500
        p, d = await pair.settled()
        assert p["kv_used_tokens"] == [0, 0] and d["kv_used_tokens"] == [0] * DECODE_DP


async def test_broken_transfer_fails_the_decode() -> None:
    async with nixl_pair() as pair:
        await pair.client.put(f"{pair.decode}/_sim/faults", json={"generate": "transfer_fail", "remaining": 1})
        plan, prefill_answer = await pair.prefill_leg(chat_body(max_tokens=20), 0, 1)
        leg = plan.decode(prefill_answer)
        answer = await pair.client.post(f"{pair.decode}/v1/chat/completions", json=leg.body, headers=leg.headers)
        assert answer.status_code == 500
        _, d = await pair.settled(prefill=False)
        assert d["transfers_failed"] == [0, 1, 0, 0] and d["kv_used_tokens"] == [0] * DECODE_DP


async def test_decode_metrics_count_kv_fetches() -> None:
    async with nixl_pair() as pair:
        plan, prefill_answer = await pair.prefill_leg(chat_body(max_tokens=20), 0, 1)
        prefill_answer["kv_transfer_params"]["remote_request_id"] = "nobody"  # fails at once: nothing in flight
        leg = plan.decode(prefill_answer)
        await pair.client.post(f"{pair.decode}/v1/chat/completions", json=leg.body, headers=leg.headers)
        text = (await pair.client.get(f"{pair.decode}/metrics")).text
        stages = {
            (s.labels["engine"], s.labels["stage"]): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "vllm:num_requests_kv_fetch_by_stage"
        }
        assert stages == {(str(r), st): 0.0 for r in range(DECODE_DP) for st in STAGES}
        prefill_text = (await pair.client.get(f"{pair.prefill}/metrics")).text
        assert "vllm:num_requests_kv_fetch_by_stage" not in prefill_text


STAGES = ("waiting_to_start", "in_progress", "completed_waiting")
