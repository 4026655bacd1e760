"""SGLang-flavoured P/D mock engines: a prefill mock and a decode mock in one process, the legs built with
gateway.pd.sglang_bootstrap and sent by hand, concurrently, as the SGLang Model Gateway sends them."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.pd import DecodeSide, PrefillSide
from gateway.pd.sglang_bootstrap import attempt
from gateway.replay.client import request_body
from gateway.serving import serve_in_background
from gateway.sim.calibration import EngineModelConfig
from gateway.sim.mock_engine.app import MockEngineConfig, create_mock_engine_app
from gateway.sim.mock_engine.protocol import natural_length

MODEL = "deepseek-v3"
FAST = 1000.0
PREFILL_DP, DECODE_DP = 4, 2
SHORT_TIMEOUT_S = 0.5  # the handoff timeout of the tests of a timeout (SGLang's 300 s), wall seconds
LONG_TIMEOUT_S = 60.0  # the handoff timeout of the other tests: a slow machine does not make a handoff time out
POLLS, POLL_S = 500, 0.01


@dataclass
class Pair:
    prefill: str
    decode: str
    prefill_port: int
    client: httpx.AsyncClient

    def sides(self, p: int, d: int) -> tuple[PrefillSide, DecodeSide]:
        return PrefillSide("p", p, PREFILL_DP, "127.0.0.1", self.prefill_port), DecodeSide("d", d)

    async def seen(self, url: str) -> dict[str, Any]:
        answer = await self.client.get(f"{url}/_sim/requests")
        assert answer.status_code == 200
        result: dict[str, Any] = answer.json()
        return result

    async def settled(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Both mocks' counters once nothing is left running or holding KV on either (bounded polling)."""
        for _ in range(POLLS):
            p, d = await self.seen(self.prefill), await self.seen(self.decode)
            if not any(p["running"] + p["held"] + d["running"] + d["held"]):
                return p, d
            await asyncio.sleep(POLL_S)
        raise AssertionError(f"still running: prefill {p}, decode {d}")


@asynccontextmanager
async def pd_pair(
    timeout_s: float = LONG_TIMEOUT_S,
    decode_kv: int | None = None,
    prefill_speed: float = FAST,
    force_query_prefill_dp_rank: bool = False,
    prefill_model: EngineModelConfig | None = None,
) -> AsyncIterator[Pair]:
    model = EngineModelConfig() if decode_kv is None else replace(EngineModelConfig(), kv_capacity_tokens=decode_kv)
    prefill = create_mock_engine_app(
        MockEngineConfig(
            "sglang",
            PREFILL_DP,
            speed=prefill_speed,
            role="prefill",
            pd_timeout_s=timeout_s,
            force_query_prefill_dp_rank=force_query_prefill_dp_rank,
            engine_model=prefill_model or EngineModelConfig(),
        )
    )
    decode = create_mock_engine_app(
        MockEngineConfig("sglang", DECODE_DP, speed=FAST, role="decode", pd_timeout_s=timeout_s, engine_model=model)
    )
    async with AsyncExitStack() as stack:
        prefill_url = await stack.enter_async_context(serve_in_background(prefill))
        decode_url = await stack.enter_async_context(serve_in_background(decode))
        client = await stack.enter_async_context(httpx.AsyncClient(timeout=30.0))
        yield Pair(prefill_url, decode_url, int(prefill_url.rsplit(":", 1)[1]), client)


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about P/D disaggregation"}], **extra}


async def send_both(pair: Pair, prefill: dict[str, Any], decode: dict[str, Any]) -> tuple[httpx.Response, ...]:
    return tuple(
        await asyncio.gather(
            pair.client.post(f"{pair.prefill}/v1/chat/completions", json=prefill),
            pair.client.post(f"{pair.decode}/v1/chat/completions", json=decode),
        )
    )


def sse_payloads(text: str) -> list[Any]:
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


@pytest.mark.parametrize("stream", [False, True])
async def test_answer_comes_from_decode_ranks_pinned_kv_freed(stream: bool) -> None:
    body = chat_body(max_tokens=300, stream=stream)
    expected = min(300, natural_length(body, 0))
    rng = random.Random(7)
    async with pd_pair() as pair:
        legs = attempt(body, *pair.sides(3, 1), rng)
        prefill, decode = await send_both(pair, legs.prefill.body, legs.decode().body)
        assert (prefill.status_code, decode.status_code) == (200, 200)
        if stream:
            events = sse_payloads(decode.text)
            assert events[-1] == "[DONE]"
            content = [e["choices"][0]["delta"].get("content") for e in events[:-1] if e["choices"]]
            assert "".join(c for c in content if c) == " tok" * expected
            assert [e["choices"][0]["finish_reason"] for e in events[:-1]][-1] == "stop"
        else:
            answer = decode.json()
            assert answer["choices"][0]["message"]["content"] == " tok" * expected
            assert answer["usage"]["completion_tokens"] == expected
            assert answer["choices"][0]["finish_reason"] == "stop"
            drained = prefill.json()  # the prefill's answer, drained by the router: one token, "length"
            assert drained["usage"]["completion_tokens"] == 1
            assert drained["choices"][0]["finish_reason"] == "length"
        p, d = await pair.settled()
        assert p["pinned"] == [0, 0, 0, 1] and p["placed"] == [0, 0, 0, 0]
        assert d["pinned"] == [0, 1] and d["placed"] == [0, 0]
        assert p["transfers_completed"] == [0, 0, 0, 1] and d["transfers_completed"] == [0, 1]
        assert p["kv_used_tokens"] == [0] * PREFILL_DP and d["kv_used_tokens"] == [0] * DECODE_DP


async def test_unpinned_prefill_follows_the_room() -> None:
    async with pd_pair() as pair:
        room = 4 * 1000 + 2
        common = chat_body(max_tokens=5, bootstrap_host="127.0.0.1", bootstrap_port=pair.prefill_port)
        prefill, decode = await send_both(pair, common | {"bootstrap_room": room}, common | {"bootstrap_room": room})
        assert (prefill.status_code, decode.status_code) == (200, 200)
        p, d = await pair.settled()
        assert p["placed"] == [0, 0, 1, 0]  # room % 4
        assert d["placed"] == [1, 0]  # SGLang's round robin
        assert d["transfers_completed"] == [1, 0]


async def test_many_concurrent_requests_all_answered() -> None:
    rng = random.Random(11)
    async with pd_pair() as pair:
        plans = [attempt(chat_body(max_tokens=20, n=1), *pair.sides(i % 4, i % 2), rng) for i in range(12)]
        answers = await asyncio.gather(*(send_both(pair, a.prefill.body, a.decode().body) for a in plans))
        assert all(p.status_code == 200 and d.status_code == 200 for p, d in answers)
        p, d = await pair.settled()
        assert p["transfers_completed"] == [3, 3, 3, 3]
        assert d["transfers_completed"] == [6, 6]


async def test_reused_room_is_refused() -> None:
    rng = random.Random(3)
    async with pd_pair() as pair:
        legs = attempt(chat_body(max_tokens=5), *pair.sides(1, 0), rng)
        first = await send_both(pair, legs.prefill.body, legs.decode().body)
        assert [r.status_code for r in first] == [200, 200]
        again = await pair.client.post(f"{pair.prefill}/v1/chat/completions", json=legs.prefill.body)
        assert again.status_code == 500
        error = again.json()
        assert error["object"] == "error" and error["type"] == "500" and error["code"] == 500
        assert error["message"].startswith("Prefill bootstrap failed for request rank=1 req.rid='")
        assert error["message"].endswith(
            f"req.bootstrap_room={legs.room} with exception KVTransferError(bootstrap_room={legs.room}): "
            "Duplicate or cancelled bootstrap room"
        )


async def test_rank_conflicting_with_the_room_is_refused() -> None:
    async with pd_pair() as pair:
        room = 4 * 77 + 1  # implies prefill rank 1
        body = chat_body(
            max_tokens=5, bootstrap_host="127.0.0.1", bootstrap_port=pair.prefill_port, bootstrap_room=room
        )
        answer = await pair.client.post(f"{pair.prefill}/v1/chat/completions", json=body | {"routed_dp_rank": 2})
        assert answer.status_code == 500
        assert answer.json()["message"].endswith(
            f"follow_bootstrap_room conflict: dispatched to dp_rank 2 but bootstrap_room {room} implies dp_rank 1. "
            "Set SGLANG_DISAGGREGATION_FORCE_QUERY_PREFILL_DP_RANK=1 to allow mixed routing."
        )
        streamed = await pair.client.post(
            f"{pair.prefill}/v1/chat/completions",
            json=body | {"routed_dp_rank": 2, "bootstrap_room": room + 4, "stream": True},
        )
        assert streamed.status_code == 200
        events = sse_payloads(streamed.text)
        assert events[-1] == "[DONE]"
        assert events[0]["error"]["type"] == "INTERNAL_SERVER_ERROR" and events[0]["error"]["code"] == 500
        # with disagg_prefill_dp_rank on the request the check does not apply (req_has_disagg_prefill_dp_rank)
        exempt = body | {"routed_dp_rank": 2, "bootstrap_room": room + 8, "disagg_prefill_dp_rank": 2}
        decode = body | {"bootstrap_room": room + 8, "disagg_prefill_dp_rank": 2}
        answers = await send_both(pair, exempt, decode)
        assert [a.status_code for a in answers] == [200, 200]
        p, _ = await pair.settled()
        assert p["transfers_failed"] == [0, 0, 2, 0]


async def test_forced_query_serves_a_rank_conflicting_with_the_room() -> None:
    # the SGLang Model Gateway's pins (routed_dp_rank on the prefill leg, disagg_prefill_dp_rank on the decode leg
    # only) with a room that does not imply the prefill rank
    async with pd_pair(force_query_prefill_dp_rank=True) as pair:
        room = 4 * 77 + 1  # implies prefill rank 1
        common = chat_body(
            max_tokens=5, bootstrap_host="127.0.0.1", bootstrap_port=pair.prefill_port, bootstrap_room=room
        )
        prefill = common | {"routed_dp_rank": 2}
        decode = common | {"routed_dp_rank": 0, "disagg_prefill_dp_rank": 2}
        answers = await send_both(pair, prefill, decode)
        assert [a.status_code for a in answers] == [200, 200]
        p, d = await pair.settled()
        assert p["pinned"] == [0, 0, 1, 0] and p["transfers_completed"] == [0, 0, 1, 0]
        assert d["transfers_completed"] == [1, 0]


async def test_prefill_finds_a_shared_prefix_in_its_rank_cache() -> None:
    # two prompts sharing two 512-token blocks (the replay's text for the trace's hash_ids) on prefill rank 1
    rng = random.Random(14)
    async with pd_pair(prefill_model=EngineModelConfig.as_shipped("sglang", PREFILL_DP)) as pair:
        for index, blocks in enumerate([(5, 6, 7), (5, 6, 8)]):
            body = request_body("chat", MODEL, index, 1300, 4, "estimate", blocks) | {"stream": False}
            legs = attempt(body, *pair.sides(1, 0), rng)
            answers = await send_both(pair, legs.prefill.body, legs.decode().body)
            assert [a.status_code for a in answers] == [200, 200]
        p, d = await pair.settled()
    assert p["prefix_cache_hits"] == [0, 1024, 0, 0] and p["prefix_cache_queries"] == [0, 2600, 0, 0]
    assert sum(d["prefix_cache_hits"]) == 0  # the decode side takes the whole KV from the prefill


@pytest.mark.parametrize(("role", "method"), [("prefill", "follow_bootstrap_room"), ("decode", "round_robin")])
async def test_server_info_reports_the_resolved_load_balance_method(role: str, method: str) -> None:
    async with pd_pair() as pair:
        url = pair.prefill if role == "prefill" else pair.decode
        info = (await pair.client.get(f"{url}/server_info")).json()
        assert (info["disaggregation_mode"], info["load_balance_method"]) == (role, method)


@pytest.mark.parametrize("role", ["prefill", "decode"])
async def test_missing_room_is_refused(role: str) -> None:
    async with pd_pair() as pair:
        url = pair.prefill if role == "prefill" else pair.decode
        answer = await pair.client.post(f"{url}/v1/chat/completions", json=chat_body(max_tokens=5))
        assert answer.status_code == 400
        error = answer.json()
        assert error["type"] == "BadRequestError"
        assert error["message"].startswith(
            "Invalid request: Disaggregated request received without bootstrap room id. req.rid='"
        )


async def test_decode_without_its_prefill_times_out_and_frees_its_reservation() -> None:
    rng = random.Random(5)
    async with pd_pair(SHORT_TIMEOUT_S) as pair:
        legs = attempt(chat_body(max_tokens=5), *pair.sides(2, 1), rng)
        answer = await pair.client.post(f"{pair.decode}/v1/chat/completions", json=legs.decode().body)
        assert answer.status_code == 500
        message = answer.json()["message"]
        assert message.startswith("Decode transfer failed for request rank=1 decode_req.req.rid='")
        assert f"KVTransferError(bootstrap_room={legs.room}): Request {legs.room} timed out after " in message
        assert message.endswith("s in KVPoll.WaitingForInput")
        _, d = await pair.settled()
        assert d["transfers_failed"] == [0, 1]
        assert d["kv_used_tokens"] == [0, 0]


async def test_prefill_without_its_decode_times_out() -> None:
    rng = random.Random(6)
    async with pd_pair(SHORT_TIMEOUT_S) as pair:
        legs = attempt(chat_body(max_tokens=5), *pair.sides(0, 0), rng)
        answer = await pair.client.post(f"{pair.prefill}/v1/chat/completions", json=legs.prefill.body)
        assert answer.status_code == 500
        assert answer.json()["message"].endswith("s in KVPoll.Bootstrapping")
        p, _ = await pair.settled()
        assert p["transfers_failed"] == [1, 0, 0, 0]


async def test_unreachable_bootstrap_fails_the_decode() -> None:
    async with pd_pair() as pair:
        body = chat_body(max_tokens=5, bootstrap_host="127.0.0.1", bootstrap_port=1, bootstrap_room=12)
        answer = await pair.client.post(f"{pair.decode}/v1/chat/completions", json=body)
        assert answer.status_code == 500
        assert answer.json()["message"].endswith(
            "Could not fetch prefill parallel info from bootstrap_addr: 127.0.0.1:1"
        )


async def test_aborted_prefill_leaves_nothing_running() -> None:
    rng = random.Random(9)
    async with pd_pair(SHORT_TIMEOUT_S, prefill_speed=1.0) as pair:  # a 40k-token prompt prefills for about 5 s
        body = {"model": MODEL, "prompt": "word " * 40_000, "max_tokens": 5}
        legs = attempt(body, *pair.sides(1, 0), rng)
        decode = asyncio.ensure_future(pair.client.post(f"{pair.decode}/v1/completions", json=legs.decode().body))
        prefill = asyncio.ensure_future(pair.client.post(f"{pair.prefill}/v1/completions", json=legs.prefill.body))
        for _ in range(POLLS):  # the decode side has connected, and the prefill is running on rank 1
            if (await pair.seen(pair.prefill))["running"][1] == 1:
                break
            await asyncio.sleep(POLL_S)
        prefill.cancel()  # the client (the gateway) drops the prefill leg
        with pytest.raises(asyncio.CancelledError):
            await prefill
        answer = await decode  # SGLang does not tell the decode: it fails at its waiting timeout
        assert answer.status_code == 500
        assert answer.json()["message"].endswith("s in KVPoll.WaitingForInput")
        p, d = await pair.settled()
        assert sum(p["transfers_completed"]) == 0 and d["transfers_failed"] == [1, 0]


async def test_aborted_decode_fails_its_prefill_at_once() -> None:
    rng = random.Random(10)
    async with pd_pair(timeout_s=60.0) as pair:
        legs = attempt(chat_body(max_tokens=5), *pair.sides(2, 1), rng)
        decode = asyncio.ensure_future(pair.client.post(f"{pair.decode}/v1/chat/completions", json=legs.decode().body))
        for _ in range(POLLS):  # the decode leg has connected to the prefill mock
            loads = (await pair.client.get(f"{pair.decode}/v1/loads")).json()["loads"]
            if loads[1]["disaggregation"]["decode_transfer_queue_reqs"] == 1:
                break
            await asyncio.sleep(POLL_S)
        decode.cancel()
        with pytest.raises(asyncio.CancelledError):
            await decode
        answer = await pair.client.post(f"{pair.prefill}/v1/chat/completions", json=legs.prefill.body)
        assert answer.status_code == 500  # well before its 60 s timeout
        assert answer.json()["message"].endswith("Failed due to an unknown reason from another rank")
        await pair.settled()


async def test_loads_and_metrics_report_the_pd_queues() -> None:
    rng = random.Random(12)
    async with pd_pair(timeout_s=60.0, decode_kv=2400) as pair:
        # decode rank 0 has 2,400 tokens of KV: the second request (2,010 with its output) waits for a reservation
        first = attempt(chat_body(max_tokens=2000, ignore_eos=True), *pair.sides(0, 0), rng)
        second = attempt(chat_body(max_tokens=2000, ignore_eos=True), *pair.sides(0, 0), rng)
        tasks = [
            asyncio.ensure_future(pair.client.post(f"{pair.decode}/v1/chat/completions", json=a.decode().body))
            for a in (first, second)
        ]
        for _ in range(POLLS):
            load = (await pair.client.get(f"{pair.decode}/v1/loads")).json()["loads"][0]
            if load["disaggregation"]["decode_prealloc_queue_reqs"] == 1:
                break
            await asyncio.sleep(POLL_S)
        assert load["disaggregation"]["mode"] == "decode"
        assert load["disaggregation"]["decode_transfer_queue_reqs"] == 1
        assert load["num_waiting_reqs"] == 2  # SGLang's load inquirer counts both queues as waiting
        # the same prompt twice: reserved for the transfer, and still to reserve; neither request's KV has arrived
        assert load["num_total_tokens"] == 2 * load["num_used_tokens"] > 0
        assert load["num_active_tokens"] == 0
        metrics = (await pair.client.get(f"{pair.decode}/metrics")).text
        samples = {
            (s.name, s.labels.get("dp_rank"), s.labels.get("engine_type")): s.value
            for family in text_string_to_metric_families(metrics)
            for s in family.samples
        }
        assert samples["sglang:num_decode_prealloc_queue_reqs", "0", "decode"] == 1.0
        assert samples["sglang:num_decode_transfer_queue_reqs", "0", "decode"] == 1.0
        prefill_load = (await pair.client.get(f"{pair.prefill}/v1/loads")).json()["loads"][0]
        assert prefill_load["disaggregation"]["mode"] == "prefill"
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        _, d = await pair.settled()
        assert d["kv_used_tokens"] == [0, 0]


async def test_client_leaving_mid_stream_leaves_nothing_running() -> None:
    rng = random.Random(13)
    async with pd_pair() as pair:
        legs = attempt(chat_body(max_tokens=100_000, ignore_eos=True, stream=True), *pair.sides(0, 1), rng)
        prefill = asyncio.ensure_future(pair.client.post(f"{pair.prefill}/v1/chat/completions", json=legs.prefill.body))
        async with pair.client.stream("POST", f"{pair.decode}/v1/chat/completions", json=legs.decode().body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break  # the first token is here: leave
        assert (await prefill).status_code == 200  # the prefill had handed its KV over
        p, d = await pair.settled()
        assert p["transfers_completed"] == [1, 0, 0, 0] and d["transfers_completed"] == [0, 1]
        assert d["kv_used_tokens"] == [0, 0]


async def test_broken_transfer_fails_both_legs_and_leaves_nothing_running() -> None:
    rng = random.Random(14)
    async with pd_pair(timeout_s=60.0) as pair:
        fault = {"generate": "transfer_fail", "remaining": 1}
        assert (await pair.client.put(f"{pair.decode}/_sim/faults", json=fault)).status_code == 200
        legs = attempt(chat_body(max_tokens=50), *pair.sides(3, 0), rng)
        prefill, decode = await send_both(pair, legs.prefill.body, legs.decode().body)
        assert (prefill.status_code, decode.status_code) == (500, 500)  # well before the 60 s timeout
        assert decode.json()["message"].startswith("Decode transfer failed for request rank=0 ")
        assert prefill.json()["message"].startswith("Prefill transfer failed for request rank=3 ")
        p, d = await pair.settled()
        assert p["transfers_failed"] == [0, 0, 0, 1] and d["transfers_failed"] == [1, 0]
        again = attempt(chat_body(max_tokens=50), *pair.sides(3, 0), rng)  # the fault was for one request
        assert [r.status_code for r in await send_both(pair, again.prefill.body, again.decode().body)] == [200, 200]


async def test_injected_http_500_on_a_leg() -> None:
    rng = random.Random(15)
    async with pd_pair(SHORT_TIMEOUT_S) as pair:
        await pair.client.put(f"{pair.prefill}/_sim/faults", json={"generate": "http_500", "remaining": 1})
        legs = attempt(chat_body(max_tokens=5), *pair.sides(0, 0), rng)
        prefill, decode = await send_both(pair, legs.prefill.body, legs.decode().body)
        assert prefill.status_code == 500 and decode.status_code == 500  # the decode waits out its timeout
        await pair.settled()
