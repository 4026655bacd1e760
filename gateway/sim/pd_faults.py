"""P/D fault drills: the gateway in front of simulated P/D engines of one protocol, a trace's requests sent through it
concurrently (streamed and not), one fault struck mid-run, and afterwards what every client got and what is left
on every surviving engine.

The pools are ``prefill_engines`` prefill mocks and ``decode_engines`` decode mocks of ``dp_size`` ranks each
(:mod:`gateway.sim.mock_engine.pd`), served in this event loop by killable servers
(:func:`gateway.sim.mock_engine.faults.killable_server`). The faults (:data:`FAULTS`):

- ``kill_prefill`` / ``kill_decode``: one engine of that pool dies while it serves legs (its server is killed);
- ``kill_all_decode``: every decode engine dies (no healthy pair is left: the clients get errors);
- ``transfer_fail``: the KV transfers of the next ``transfer_failures`` decode legs on one decode engine break
  (the mocks' ``transfer_fail``);
- ``decode_crash``: the next ``transfer_failures`` decode legs on one decode engine break off after their first
  events (the mocks' ``kill_mid_stream``): past the first byte, a streamed client gets an error event, an
  assembled one is retried;
- ``disconnect``: no engine fault, but some streamed clients hang up after their first chunk;
- ``none``: nothing.

A request **completed** when its client got the whole answer (a non-streamed 200 with a message; a stream with
``[DONE]`` and no error event), got an **error** when it got an OpenAI-style error (a 4xx/5xx with an ``error``
object, or a stream error event before ``[DONE]``), was **disconnected** when its client hung up on purpose, and is
**lost** otherwise (a reset connection, a stream that stopped without a word, an answer that is neither).

**Left** on a surviving engine afterwards, per pool: requests running, waiting or queued in the engine (decode:
pre-allocation and transfer queues too), SGLang prefill legs waiting for their decode side, handoff state the mock
keeps, and KV held for a decode side. A vLLM prefill (NIXL and Mooncake) keeps the KV of a request whose decode leg
failed before pulling it until the engine's own lease or abort timeout (vLLM 0.34 NIXL ``kv_lease_duration``,
Mooncake ``VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT``): nothing the gateway can send frees it, so it is counted apart
(``lease_held``), and the leases are set longer than a drill lasts so that it is seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Literal, get_args

import httpx

from gateway.config import EngineConfig, HealthConfig, Settings, UpstreamConfig
from gateway.replay.client import request_body
from gateway.server.app import create_app
from gateway.sim.calibration import EngineModelConfig
from gateway.sim.mock_engine.app import MockEngineConfig, create_mock_engine_app
from gateway.sim.mock_engine.faults import KillableServer, killable_server
from gateway.telemetry import sum_samples
from gateway.workload.traces import TraceRequest

Protocol = Literal["sglang", "nixl", "mooncake"]
PROTOCOLS: tuple[Protocol, ...] = get_args(Protocol)
Fault = Literal["none", "kill_prefill", "kill_decode", "kill_all_decode", "transfer_fail", "decode_crash", "disconnect"]
FAULTS: tuple[Fault, ...] = get_args(Fault)
Outcome = Literal["completed", "error", "disconnected", "lost"]

_log = logging.getLogger(__name__)

MODEL = "deepseek-v3"
LEASE_S = 1e6
"""The vLLM prefill mocks' KV lease, engine seconds: longer than any drill, so that KV the engine would keep is
seen (vLLM's own lease is 30 s at NIXL, 480 s at Mooncake)."""


@dataclass(frozen=True)
class Drill:
    """One drill: the pools, the load, the fault.

    Attributes:
        protocol: the P/D protocol of every engine.
        fault: what goes wrong (see the module docstring).
        prefill_engines / decode_engines / dp_size: the pools (engines of ``dp_size`` DP ranks each).
        speed: the engines' clock speed, engine seconds per wall second.
        concurrency: requests in flight at once (a closed loop over the trace's requests in arrival order).
        max_output_tokens: cap on each request's output tokens (the relay's CPU bounds the drill's size).
        max_prompt_tokens: cap on each prompt, tokens.
        stream_share: fraction of requests streamed to the client (the others are answered whole).
        fault_after: the fault strikes once this fraction of the requests has been answered, on an engine that
            serves legs then (bounded wait).
        hang_first: a kill: the victim first hangs its next ``hang_first`` legs (an engine that stops answering
            before it dies) and dies once it holds them all (bounded wait): that many legs fail at once.
        transfer_failures: ``transfer_fail`` / ``decode_crash``: how many transfers or decode legs break.
        disconnect_share: ``disconnect``: fraction of streamed clients that hang up after their first chunk.
        retry_throttle_tokens: the gateway's ``upstream.retry_throttle_max_tokens`` (retries stop once half are
            spent by failures in a row; 20, the gateway's default).
        seed: seeds which requests stream and which clients hang up.
        settle_polls / settle_poll_s: how long to wait for the engines and the gateway to empty afterwards.
    """

    protocol: Protocol
    fault: Fault
    prefill_engines: int = 2
    decode_engines: int = 2
    dp_size: int = 2
    speed: float = 200.0
    concurrency: int = 24
    max_output_tokens: int = 16
    max_prompt_tokens: int = 4096
    stream_share: float = 0.5
    fault_after: float = 0.3
    hang_first: int = 0
    transfer_failures: int = 6
    disconnect_share: float = 0.25
    retry_throttle_tokens: float = 20.0
    seed: int = 0
    settle_polls: int = 400
    settle_poll_s: float = 0.025


@dataclass
class Left:
    """What is left on one surviving engine (see the module docstring)."""

    engine: str
    pool: Literal["prefill", "decode"]
    running: int
    bootstrapping: int
    handoffs: int
    held: int

    @property
    def hanging(self) -> int:
        """Requests and handoffs still in the engine, KV held for a decode side aside."""
        return self.running + self.bootstrapping + (0 if self.held else self.handoffs)


@dataclass
class DrillResult:
    """What a drill saw."""

    drill: Drill
    outcomes: Counter[str] = field(default_factory=Counter)
    errors_by_status: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    in_flight_at_fault: int = 0
    left: list[Left] = field(default_factory=list)
    gateway_inflight: int = 0
    retries: float = 0.0
    leg_failures: float = 0.0
    faults_injected: int = 0

    def left_per_pool(self) -> dict[str, dict[str, int]]:
        """Per pool: requests and handoffs left hanging, and KV kept by a vLLM prefill for its lease."""
        pools: dict[str, dict[str, int]] = {}
        for left in self.left:
            pool = pools.setdefault(left.pool, {"hanging": 0, "lease_held": 0})
            pool["hanging"] += left.hanging
            pool["lease_held"] += left.held
        return pools

    def summary(self) -> dict[str, Any]:
        """The figures as JSON-ready values."""
        drill = self.drill
        return {
            "protocol": drill.protocol,
            "fault": drill.fault,
            "sent": sum(self.outcomes.values()),
            "completed": self.outcomes["completed"],
            "errors": self.outcomes["error"],
            "disconnected": self.outcomes["disconnected"],
            "lost": self.outcomes["lost"],
            "errors_by_status": dict(sorted(self.errors_by_status.items())),
            "retries": int(self.retries),
            "leg_failures": int(self.leg_failures),
            "faults_injected": self.faults_injected,
            "in_flight_at_fault": self.in_flight_at_fault,
            "left": self.left_per_pool(),
            "gateway_inflight": self.gateway_inflight,
            "lost_examples": self.lost[:5],
        }


@dataclass
class _Engine:
    name: str
    pool: Literal["prefill", "decode"]
    server: KillableServer


@dataclass
class PdStack:
    """The running engines and gateway of a drill."""

    gateway: str
    engines: list[_Engine]
    http: httpx.AsyncClient

    def pool(self, pool: str) -> list[_Engine]:
        return [e for e in self.engines if e.pool == pool]

    async def seen(self, engine: _Engine) -> dict[str, Any]:
        answer = await self.http.get(f"{engine.server.url}/_sim/requests")
        answer.raise_for_status()
        result: dict[str, Any] = answer.json()
        return result

    async def in_flight(self, engine: _Engine) -> int:
        """Requests in ``engine``: running or queued, waiting for their decode side, or holding KV."""
        seen = await self.seen(engine)
        return int(sum(seen["running"]) + sum(seen["bootstrapping"]) + sum(seen["held"]))

    async def left(self) -> list[Left]:
        """What is left on every engine still alive."""
        result = []
        for engine in self.engines:
            if engine.server.killed:
                continue
            seen = await self.seen(engine)
            result.append(
                Left(
                    engine.name,
                    engine.pool,
                    sum(seen["running"]),
                    sum(seen["bootstrapping"]),
                    int(seen["handoffs"]),
                    sum(seen["held"]),
                )
            )
        return result

    async def metric(self, name: str) -> float:
        text = (await self.http.get(f"{self.gateway}/metrics")).text
        return sum_samples(text, name)


@contextlib.asynccontextmanager
async def pd_stack(drill: Drill) -> AsyncIterator[PdStack]:
    """Start the drill's prefill and decode mocks and a gateway (its defaults: ``sbs`` on the prefill leg, the
    decode allocation on the decode leg) in front of them."""
    protocol = drill.protocol
    flavor: Literal["sglang", "vllm"] = "sglang" if protocol == "sglang" else "vllm"
    connector: dict[str, Any] = {} if protocol == "sglang" else {"kv_connector": protocol}
    prefill_model = replace(EngineModelConfig(), kv_lease_s=LEASE_S)
    async with contextlib.AsyncExitStack() as stack:
        engines: list[_Engine] = []
        configs: list[EngineConfig] = []
        common: dict[str, Any] = {"flavor": flavor, "dp_size": drill.dp_size, "models": [MODEL], **connector}
        pools: tuple[tuple[Literal["prefill", "decode"], int], ...] = (
            ("prefill", drill.prefill_engines),
            ("decode", drill.decode_engines),
        )
        for pool, count in pools:
            for i in range(count):
                name = f"{pool[0]}{i}"
                model = prefill_model if pool == "prefill" else EngineModelConfig()
                mock = MockEngineConfig(
                    flavor,
                    drill.dp_size,
                    MODEL,
                    speed=drill.speed,
                    role=pool,
                    engine_model=model,
                    engine_id=name,
                    seed=drill.seed + len(engines),
                    **connector,
                )
                app = create_mock_engine_app(mock)
                die = partial(setattr, app.state.engine.pd, "dead", True)
                server = await stack.enter_async_context(killable_server(app, on_kill=die))
                engines.append(_Engine(name, pool, server))
                port = int(server.url.rsplit(":", 1)[1])
                bootstrap: dict[str, Any] = (
                    {"bootstrap_host": "127.0.0.1", "bootstrap_port": port}
                    if pool == "prefill" and protocol != "nixl"
                    else {}
                )
                configs.append(EngineConfig(name=name, url=server.url, role=pool, **common, **bootstrap))
        settings = Settings(
            engines=configs,
            health=HealthConfig(probe_interval_s=60),
            upstream=UpstreamConfig(
                retry_backoff_s=0.005, retry_backoff_max_s=0.05, retry_throttle_max_tokens=drill.retry_throttle_tokens
            ),
        )
        gateway = await stack.enter_async_context(_serve_gateway(settings))
        http = await stack.enter_async_context(httpx.AsyncClient(timeout=60))
        yield PdStack(gateway, engines, http)


@contextlib.asynccontextmanager
async def _serve_gateway(settings: Settings) -> AsyncIterator[str]:
    async with killable_server(create_app(settings)) as server:
        yield server.url


async def run_drill(drill: Drill, trace: Sequence[TraceRequest]) -> DrillResult:
    """Send ``trace``'s requests through the gateway with the drill's fault struck mid-run; then wait (bounded) for
    every surviving engine and the gateway to empty, and report."""
    result = DrillResult(drill)
    rng = random.Random(drill.seed)
    plans = [
        (i, r, rng.random() < drill.stream_share, rng.random() < drill.disconnect_share) for i, r in enumerate(trace)
    ]
    async with pd_stack(drill) as stack, httpx.AsyncClient(timeout=120) as client:
        answered = 0
        fault_due = max(1, int(drill.fault_after * len(plans)))
        fault_ready = asyncio.Event()
        slots = asyncio.Semaphore(drill.concurrency)

        async def one(index: int, request: TraceRequest, stream: bool, hang_up: bool) -> None:
            nonlocal answered
            async with slots:
                body = request_body(
                    "chat",
                    MODEL,
                    index,
                    min(request.prompt_tokens, drill.max_prompt_tokens),
                    max(1, min(request.output_tokens, drill.max_output_tokens)),
                )
                if not stream:
                    body["stream"] = False
                    body.pop("stream_options")
                leave = hang_up and stream and drill.fault == "disconnect"
                outcome, detail = await _send(client, stack.gateway, body, leave)
            result.outcomes[outcome] += 1
            if outcome == "error":
                result.errors_by_status[detail] += 1
            elif outcome == "lost":
                result.lost.append(f"request {index}: {detail}")
            answered += 1
            if answered >= fault_due:
                fault_ready.set()

        senders = [asyncio.create_task(one(*plan)) for plan in plans]
        striker = asyncio.create_task(_strike(drill, stack, fault_ready, result))
        await asyncio.gather(*senders)
        await striker
        await _settle(drill, stack, result)
    return result


async def _strike(drill: Drill, stack: PdStack, ready: asyncio.Event, result: DrillResult) -> None:
    """Strike the drill's fault once ``ready`` is set, on an engine that serves legs at that moment."""
    await ready.wait()
    if drill.fault in ("none", "disconnect"):
        return
    pool = "prefill" if drill.fault == "kill_prefill" else "decode"
    victims = stack.pool(pool) if drill.fault == "kill_all_decode" else stack.pool(pool)[:1]
    injected = drill.fault in ("transfer_fail", "decode_crash")
    if drill.hang_first and not injected:
        hang = {"generate": "hang", "remaining": drill.hang_first}
        (await stack.http.put(f"{victims[0].server.url}/_sim/faults", json=hang)).raise_for_status()
    for _ in range(1000):  # until the first victim serves legs, or holds its hung ones (bounded)
        result.in_flight_at_fault = sum([await stack.in_flight(v) for v in victims])
        hung = (await stack.http.get(f"{victims[0].server.url}/_sim/faults")).json()["injected"].get("hang", 0)
        result.in_flight_at_fault += hung
        if hung >= drill.hang_first and result.in_flight_at_fault:
            break
        await asyncio.sleep(0.005)
    if injected:
        generate = "transfer_fail" if drill.fault == "transfer_fail" else "kill_mid_stream"
        plan = {"generate": generate, "remaining": drill.transfer_failures, "after_chunks": 2}
        (await stack.http.put(f"{victims[0].server.url}/_sim/faults", json=plan)).raise_for_status()
        return
    for victim in victims:
        await victim.server.kill()
    result.faults_injected = len(victims)


async def _settle(drill: Drill, stack: PdStack, result: DrillResult) -> None:
    """Wait (at most ``settle_polls`` polls) for nothing to hang on the surviving engines and the gateway; record
    what is left."""
    for _ in range(drill.settle_polls):
        result.left = await stack.left()
        result.gateway_inflight = int(await stack.metric("gateway_inflight_requests"))
        if result.gateway_inflight == 0 and not any(left.hanging for left in result.left):
            break
        await asyncio.sleep(drill.settle_poll_s)
    result.retries = await stack.metric("gateway_upstream_retries_total")
    result.leg_failures = await stack.metric("gateway_pd_leg_failures_total")
    if drill.fault in ("transfer_fail", "decode_crash"):
        faults = (await stack.http.get(f"{stack.pool('decode')[0].server.url}/_sim/faults")).json()
        result.faults_injected = sum(faults["injected"].values())


async def _send(client: httpx.AsyncClient, gateway: str, body: dict[str, Any], leave: bool) -> tuple[Outcome, str]:
    """One request; its outcome and (errors: the HTTP status or ``stream``; lost: what happened)."""
    url = f"{gateway}/v1/chat/completions"
    try:
        if not body["stream"]:
            answer = await client.post(url, json=body)
            return _whole(answer.status_code, answer.content)
        async with client.stream("POST", url, json=body) as answer:
            if answer.status_code != 200:
                return _whole(answer.status_code, await answer.aread())
            return await _stream(answer, leave)
    except httpx.HTTPError as exc:
        return "lost", f"{type(exc).__name__}: {exc}"


def _whole(status: int, raw: bytes) -> tuple[Outcome, str]:
    try:
        parsed = json.loads(raw)
    except ValueError:
        return "lost", f"HTTP {status}, not JSON: {raw[:100]!r}"
    if status == 200:
        choices = parsed.get("choices") if isinstance(parsed, dict) else None
        if choices and choices[0].get("message", {}).get("content"):
            return "completed", ""
        return "lost", f"HTTP 200 without a message: {raw[:100]!r}"
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict) and error.get("message"):
        _log.info("HTTP %d: %s", status, error["message"])
        return "error", str(status)
    return "lost", f"HTTP {status} without an OpenAI error: {raw[:100]!r}"


async def _stream(answer: httpx.Response, leave: bool) -> tuple[Outcome, str]:
    text = False
    async for line in answer.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return ("completed", "") if text else ("lost", "[DONE] without text")
        event = json.loads(data)
        if "error" in event:
            _log.info("stream error: %s", event["error"])
            return "error", "stream"
        text = text or any((c.get("delta") or {}).get("content") for c in event.get("choices", []))
        if leave and text:
            return "disconnected", ""
    return "lost", "the stream ended without [DONE]"
