"""The P/D relay against small fake engines written here: each protocol's legs carry exactly what ``gateway/pd``
builds for the chosen ranks, the answer is the decode leg's (streamed and not, through the official ``openai``
client), a failed leg cancels the other at once, a retry is a new attempt (a new room), and a client that leaves
aborts both legs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from gateway.config import EngineConfig, HealthConfig, PdConfig, ScrapeConfig, Settings, UpstreamConfig
from gateway.pd import DecodeSide, PrefillSide, sglang_bootstrap, vllm_mooncake, vllm_nixl
from gateway.server.app import create_app
from gateway.server.state import GatewayState
from gateway.serving import serve_in_background
from tests.helpers import MODEL, eventually, total

MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]
ANSWER = "Hello from decode"
ENGINE_IDS = {0: "prefill-engine_dp0", 1: "prefill-engine_dp1"}


@dataclass
class Fake:
    """A fake P/D engine: records every leg it gets and behaves as ``modes`` says, one mode per request (then
    ``ok``):

    - ``ok``: prefill answers at once (SGLang, Mooncake: the transfer is then "done"); decode waits for its
      transfer, then answers ``ANSWER`` (streamed when asked);
    - ``fail``: prefill answers 500 once the decode leg of the same attempt arrived; ``fail_now``: at once;
    - ``transfer_then_hold``: prefill lets the decode leg go on, then holds;
    - ``reject``: prefill answers 400 once the decode leg of the same attempt arrived;
    - ``retract``: decode answers 503 (SGLang's retraction) once the prefill leg of the same attempt arrived;
    - ``hold``: holds the request until the gateway drops the connection;
    - ``first_then_hold``: decode streams its first event, then holds.
    """

    role: str
    flavor: str
    connector: str | None
    world: World
    modes: list[str] = field(default_factory=list)
    received: list[tuple[dict[str, Any], dict[str, str]]] = field(default_factory=list)
    dropped: int = 0

    def key(self, body: dict[str, Any]) -> str | None:
        """What joins the two legs of one attempt: the room, the transfer id (NIXL: nothing)."""
        if self.flavor == "sglang":
            return str(body["bootstrap_room"])
        params = body.get("kv_transfer_params") or {}
        return params.get("transfer_id")

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> Response:
            return Response(status_code=200)

        @app.get("/metrics")
        async def metrics() -> PlainTextResponse:
            return PlainTextResponse("")

        @app.get("/query")
        async def query() -> JSONResponse:
            return JSONResponse({str(rank): {"engine_id": eid, "worker_addr": {}} for rank, eid in ENGINE_IDS.items()})

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            body = await request.json()
            self.received.append((body, dict(request.headers)))
            mode = self.modes.pop(0) if self.modes else "ok"
            key = self.key(body)
            self.world.arrived.setdefault(self.role, set()).add(key)
            if self.role == "prefill":
                return await self.prefill(request, body, mode, key)
            return await self.decode(request, body, mode, key)

        return app

    async def until(self, request: Request, condition: Callable[[], bool]) -> bool:
        """Wait until ``condition`` holds (``True``) or the gateway drops the connection (``False``, counted; inside
        a stream the server cancels the waiting generator instead, counted too)."""
        try:
            while not condition():
                if await request.is_disconnected():
                    self.dropped += 1
                    return False
                await asyncio.sleep(0.005)
        except asyncio.CancelledError:
            self.dropped += 1
            raise
        return True

    async def prefill(self, request: Request, body: dict[str, Any], mode: str, key: str | None) -> Response:
        if mode == "hold":
            await self.until(request, lambda: False)
            return Response(status_code=499)
        if mode == "fail_now":
            return JSONResponse({"object": "error", "message": "prefill broke", "code": 500}, 500)
        if mode == "transfer_then_hold":
            self.world.transferred.add(key)
            await self.until(request, lambda: False)
            return Response(status_code=499)
        if mode == "reject":
            if await self.until(request, lambda: key in self.world.arrived.get("decode", set())):
                return JSONResponse({"object": "error", "message": "bad sampling params", "code": 400}, 400)
            return Response(status_code=499)
        if mode == "fail":
            if await self.until(request, lambda: key in self.world.arrived.get("decode", set())):
                return JSONResponse({"object": "error", "message": "prefill broke", "code": 500}, 500)
            return Response(status_code=499)
        self.world.transferred.add(key)
        answer: dict[str, Any] = {"id": "cmpl-prefill", "object": "chat.completion", "choices": []}
        if self.connector == "nixl":
            answer["kv_transfer_params"] = {"do_remote_prefill": True, "remote_engine_id": "p_dp0", "remote_port": 5600}
        return JSONResponse(answer)

    async def decode(self, request: Request, body: dict[str, Any], mode: str, key: str | None) -> Response:
        if mode == "retract":
            if await self.until(request, lambda: key in self.world.arrived.get("prefill", set())):
                return JSONResponse({"object": "error", "message": "retracted", "code": 503}, 503)
            return Response(status_code=499)
        if mode == "hold":
            await self.until(request, lambda: False)
            return Response(status_code=499)
        if not body.get("stream"):
            return JSONResponse({"id": "d", "object": "chat.completion", "choices": [{"message": {"content": ANSWER}}]})
        return StreamingResponse(self.events(request, body, mode, key), media_type="text/event-stream")

    async def events(self, request: Request, body: dict[str, Any], mode: str, key: str | None) -> AsyncIterator[bytes]:
        if self.connector != "nixl" and not await self.until(request, lambda: key in self.world.transferred):
            return

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            event = {"id": "chatcmpl-d", "object": "chat.completion.chunk", "created": 1, "model": MODEL}
            return f"data: {json.dumps(event | {'choices': [choice]})}\n\n".encode()

        yield chunk({"role": "assistant", "content": "Hello"})
        if mode == "first_then_hold":
            await self.until(request, lambda: False)
            return
        yield chunk({"content": " from decode"}, "stop")
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
            event = {"id": "chatcmpl-d", "object": "chat.completion.chunk", "created": 1, "model": MODEL}
            yield f"data: {json.dumps(event | {'choices': [], 'usage': usage})}\n\n".encode()
        yield b"data: [DONE]\n\n"


@dataclass
class World:
    """What the two fakes share: the attempts whose KV was "transferred", and the legs that arrived by role."""

    transferred: set[str | None] = field(default_factory=set)
    arrived: dict[str, set[str | None]] = field(default_factory=dict)


@dataclass
class PdSetup:
    gateway_url: str
    app: FastAPI
    prefill: Fake
    decode: Fake
    prefill_port: int

    @property
    def state(self) -> GatewayState:
        state = self.app.state.gateway
        assert isinstance(state, GatewayState)
        return state

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.gateway_url}/v1", api_key="unused", max_retries=0)

    async def metric(self, name: str, **labels: str) -> float:
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"{self.gateway_url}/metrics")).text
        return total(text, name, **labels)


@contextlib.asynccontextmanager
async def pd_gateway(protocol: str, pd: PdConfig | None = None) -> AsyncIterator[PdSetup]:
    """A gateway (round robin on both legs) in front of a fake prefill engine and a fake decode engine of 2 DP
    ranks each speaking ``protocol``."""
    flavor = "sglang" if protocol == "sglang" else "vllm"
    connector = None if protocol == "sglang" else protocol
    world = World()
    prefill, decode = Fake("prefill", flavor, connector, world), Fake("decode", flavor, connector, world)
    async with serve_in_background(prefill.app()) as prefill_url, serve_in_background(decode.app()) as decode_url:
        port = int(prefill_url.rsplit(":", 1)[1])
        bootstrap = {"bootstrap_port": port, "bootstrap_host": "127.0.0.1"} if protocol != "nixl" else {}
        common: dict[str, Any] = {"flavor": flavor, "dp_size": 2, "models": [MODEL], "prefill_alignment": "none"}
        if connector:
            common["kv_connector"] = connector
        settings = Settings(
            policy="round_robin",
            engines=[
                EngineConfig(name="p", url=prefill_url, role="prefill", **common, **bootstrap),
                EngineConfig(name="d", url=decode_url, role="decode", **common),
            ],
            pd=pd or PdConfig(),
            health=HealthConfig(probe_interval_s=60),
            scrape=ScrapeConfig(interval_s=60),
            upstream=UpstreamConfig(retry_backoff_s=0.001, retry_backoff_max_s=0.001),
        )
        app = create_app(settings)
        async with serve_in_background(app) as gateway_url:
            yield PdSetup(gateway_url, app, prefill, decode, port)


def upstream_body(stream: bool) -> dict[str, Any]:
    """The body the gateway builds the legs from, the same for both: the client's, asking for a stream with usage
    (a streamed client's usage is dropped before it; a non-streamed client's answer is assembled from the
    stream)."""
    return {
        "messages": MESSAGES,
        "model": MODEL,
        "max_tokens": 20,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def ask(setup: PdSetup, stream: bool) -> str:
    """One chat request through the official client; the answer's text."""
    async with setup.client() as client:
        if not stream:
            completion = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20)  # type: ignore[arg-type]
            return completion.choices[0].message.content or ""
        parts = []
        async for chunk in await client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=20,
            stream=True,
        ):
            parts += [c.delta.content or "" for c in chunk.choices]
        return "".join(parts)


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "assembled"])
async def test_sglang_legs_are_what_gateway_pd_builds(stream: bool) -> None:
    async with pd_gateway("sglang") as setup:
        setup.state.pd_rng = random.Random(11)
        assert await ask(setup, stream) == ANSWER
        plan = sglang_bootstrap.attempt(
            upstream_body(stream),
            PrefillSide("p", 0, 2, "127.0.0.1", setup.prefill_port),
            DecodeSide("d", 0),
            random.Random(11),
        )
        ((prefill, _),) = setup.prefill.received
        ((decode, _),) = setup.decode.received
        assert prefill == plan.prefill.body
        assert decode == plan.decode().body
        assert prefill["routed_dp_rank"] == 0 and decode["routed_dp_rank"] == 0
        assert decode["disagg_prefill_dp_rank"] == 0 and prefill["bootstrap_room"] % 2 == 0
        assert await setup.metric("gateway_pd_transfers_total", protocol="sglang", outcome="ok") == 1
        # the second request goes to the next pair (round robin on both legs)
        assert await ask(setup, stream) == ANSWER
        prefill, decode = setup.prefill.received[1][0], setup.decode.received[1][0]
        assert (prefill["routed_dp_rank"], decode["routed_dp_rank"], decode["disagg_prefill_dp_rank"]) == (1, 1, 1)
        assert prefill["bootstrap_room"] % 2 == 1
        await eventually(_idle(setup))


async def test_follow_bootstrap_room_sends_no_prefill_pin() -> None:
    async with pd_gateway("sglang", PdConfig(prefill_policy="follow_bootstrap_room")) as setup:
        assert await ask(setup, True) == ANSWER
        ((prefill, _),) = setup.prefill.received
        ((decode, _),) = setup.decode.received
        assert "routed_dp_rank" not in prefill and "disagg_prefill_dp_rank" not in decode
        assert prefill["bootstrap_room"] == decode["bootstrap_room"]
        assert decode["routed_dp_rank"] == 0


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "assembled"])
async def test_nixl_legs_are_what_gateway_pd_builds(stream: bool) -> None:
    async with pd_gateway("nixl") as setup:
        assert await ask(setup, stream) == ANSWER
        ((prefill, prefill_headers),) = setup.prefill.received
        ((decode, decode_headers),) = setup.decode.received
        attempt_id = prefill_headers["x-request-id"]
        plan = vllm_nixl.attempt(
            upstream_body(stream), PrefillSide("p", 0, 2, "127.0.0.1"), DecodeSide("d", 0), attempt_id
        )
        assert prefill == plan.prefill.body
        assert prefill_headers["x-data-parallel-rank"] == "0"
        returned = {"do_remote_prefill": True, "remote_engine_id": "p_dp0", "remote_port": 5600}
        expected = plan.decode({"kv_transfer_params": returned})
        assert decode == expected.body
        assert decode_headers["x-request-id"] == attempt_id and decode_headers["x-data-parallel-rank"] == "0"
        assert await setup.metric("gateway_pd_transfers_total", protocol="nixl", outcome="ok") == 1


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "assembled"])
async def test_mooncake_legs_are_what_gateway_pd_builds(stream: bool) -> None:
    async with pd_gateway("mooncake") as setup:
        assert await ask(setup, stream) == ANSWER
        ((prefill, prefill_headers),) = setup.prefill.received
        ((decode, decode_headers),) = setup.decode.received
        plan = vllm_mooncake.attempt(
            upstream_body(stream),
            PrefillSide("p", 0, 2, "127.0.0.1", setup.prefill_port),
            DecodeSide("d", 0),
            ENGINE_IDS,
        )
        transfer_id = prefill["kv_transfer_params"]["transfer_id"]
        assert transfer_id.startswith("xfer-") and transfer_id != plan.transfer_id
        assert prefill == _with_transfer_id(plan.prefill.body, transfer_id)
        assert decode == _with_transfer_id(plan.decode().body, transfer_id)
        assert decode["kv_transfer_params"]["remote_engine_id"] == ENGINE_IDS[0]
        assert prefill_headers["x-data-parallel-rank"] == "0" and decode_headers["x-data-parallel-rank"] == "0"


def _with_transfer_id(body: dict[str, Any], transfer_id: str) -> dict[str, Any]:
    return body | {"kv_transfer_params": body["kv_transfer_params"] | {"transfer_id": transfer_id}}


def _idle(setup: PdSetup) -> Callable[[], Any]:
    async def idle() -> bool:
        return setup.state.view.inflight_count() == 0

    return idle


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "assembled"])
async def test_a_failing_prefill_cancels_the_decode_leg_and_a_retry_mints_a_new_room(stream: bool) -> None:
    async with pd_gateway("sglang") as setup:
        setup.prefill.modes = ["fail"]
        assert await ask(setup, stream) == ANSWER

        async def decode_dropped() -> bool:  # the first attempt's decode leg, dropped at once
            return setup.decode.dropped == 1

        await eventually(decode_dropped)
        rooms = [body["bootstrap_room"] for body, _ in setup.prefill.received]
        assert len(rooms) == 2 and rooms[0] != rooms[1]
        assert [body["bootstrap_room"] for body, _ in setup.decode.received] == rooms
        assert await setup.metric("gateway_pd_leg_failures_total", leg="prefill", kind="http_5xx") == 1
        assert await setup.metric("gateway_pd_transfers_total", outcome="prefill_failed") == 1
        await eventually(_idle(setup))


async def test_a_retracted_decode_cancels_the_prefill_leg_and_is_retried() -> None:
    async with pd_gateway("sglang") as setup:
        setup.prefill.modes = ["hold"]
        setup.decode.modes = ["retract"]
        assert await ask(setup, True) == ANSWER

        async def prefill_dropped() -> bool:  # the first attempt's prefill leg (the fake polls every 5 ms)
            return setup.prefill.dropped == 1

        await eventually(prefill_dropped)
        rooms = [body["bootstrap_room"] for body, _ in setup.decode.received]
        assert len(rooms) == 2 and rooms[0] != rooms[1]
        # the retry avoids the decode rank that failed
        assert [body["routed_dp_rank"] for body, _ in setup.decode.received] == [0, 1]
        assert await setup.metric("gateway_pd_leg_failures_total", leg="decode", kind="http_5xx") == 1
        await eventually(_idle(setup))


async def test_a_failing_mooncake_decode_cancels_the_prefill_and_a_retry_mints_a_new_transfer_id() -> None:
    async with pd_gateway("mooncake") as setup:
        setup.prefill.modes = ["hold"]
        setup.decode.modes = ["retract"]
        assert await ask(setup, False) == ANSWER
        assert setup.prefill.dropped == 1
        ids = [body["kv_transfer_params"]["transfer_id"] for body, _ in setup.decode.received]
        assert len(ids) == 2 and ids[0] != ids[1]


async def test_a_failing_nixl_prefill_sends_no_decode_leg_and_is_retried() -> None:
    async with pd_gateway("nixl") as setup:
        setup.prefill.modes = ["fail_now"]
        assert await ask(setup, True) == ANSWER
        assert len(setup.prefill.received) == 2 and len(setup.decode.received) == 1
        ids = [headers["x-request-id"] for _, headers in setup.prefill.received]
        assert ids[0] != ids[1]


async def test_a_client_that_leaves_before_the_first_byte_aborts_both_legs() -> None:
    async with pd_gateway("sglang") as setup:
        setup.prefill.modes = ["hold"]
        setup.decode.modes = ["hold"]
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 20, "stream": True}

        async def client() -> None:
            async with httpx.AsyncClient() as http:
                await http.post(f"{setup.gateway_url}/v1/chat/completions", json=body)

        task = asyncio.create_task(client())

        async def both_arrived() -> bool:
            return len(setup.prefill.received) == 1 and len(setup.decode.received) == 1

        await eventually(both_arrived)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

        async def both_dropped() -> bool:
            return setup.prefill.dropped == 1 and setup.decode.dropped == 1

        await eventually(both_dropped)
        await eventually(_idle(setup))
        assert await setup.metric("gateway_pd_transfers_total", outcome="cancelled") == 1


async def test_a_client_that_leaves_mid_stream_aborts_both_legs() -> None:
    async with pd_gateway("sglang") as setup:
        setup.decode.modes = ["first_then_hold"]
        setup.prefill.modes = ["transfer_then_hold"]
        async with setup.client() as client:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,  # type: ignore[arg-type]
                max_tokens=20,
                stream=True,
            )
            async for chunk in stream:
                assert chunk.choices[0].delta.content == "Hello"
                break
            await stream.close()

        async def both_dropped() -> bool:
            return setup.prefill.dropped == 1 and setup.decode.dropped == 1

        await eventually(both_dropped)
        await eventually(_idle(setup))


async def test_an_engines_4xx_on_the_prefill_leg_is_the_answer_and_cancels_the_decode_leg() -> None:
    async with pd_gateway("sglang") as setup:
        setup.prefill.modes = ["reject"]
        async with setup.client() as client:
            with pytest.raises(openai.BadRequestError, match="bad sampling params"):
                await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20)  # type: ignore[arg-type]

        async def decode_dropped() -> bool:
            return setup.decode.dropped == 1

        await eventually(decode_dropped)
        assert len(setup.prefill.received) == 1  # not retried
        assert await setup.metric("gateway_pd_transfers_total", outcome="rejected") == 1
        await eventually(_idle(setup))


async def test_vllm_n_above_one_runs_whole_on_the_decode_rank() -> None:
    async with pd_gateway("nixl") as setup, setup.client() as client:
        completion = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, n=2)  # type: ignore[arg-type]
        assert completion.choices[0].message.content == ANSWER
        assert setup.prefill.received == []
        ((decode, headers),) = setup.decode.received
        assert "kv_transfer_params" not in decode and decode["n"] == 2
        assert headers["x-data-parallel-rank"] == "0"
        assert await setup.metric("gateway_pd_transfers_total", protocol="nixl", outcome="whole") == 1
