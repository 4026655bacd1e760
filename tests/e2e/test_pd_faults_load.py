"""P/D faults under load, for each protocol (SGLang bootstrap, vLLM NIXL, vLLM Mooncake): a trace's requests go
through the gateway many at once, streamed and not, in front of two prefill and two decode mock engines, while a
prefill engine dies, a decode engine dies, KV transfers break, or streamed clients hang up
(:mod:`gateway.sim.pd_faults`). Afterwards no request is lost, every one completed while a healthy pair was left
(a decode engine dying under a stream it already started is the one error a client can get: an error event), the
gateway holds nothing, and nothing hangs on any surviving engine: no request running or queued, no SGLang prefill
leg waiting for its decode side, no handoff state, and no KV held, but for what a vLLM prefill keeps for its lease
when its decode failed before pulling it (vLLM's own behaviour, counted apart). The engines keep their 300 s / 480 s
handoff timeouts: the drill ends long before those, so only the relay's cancel path empties them."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.sim.pd_faults import PROTOCOLS, Drill, DrillResult, Fault, Protocol, run_drill
from gateway.workload.traces import TraceRequest, load_trace, resolve_trace

REQUESTS = 48


@pytest.fixture(scope="module")
def trace() -> list[TraceRequest]:
    return load_trace(resolve_trace("azure-conv"))[:REQUESTS]


async def drill(protocol: Protocol, fault: Fault, trace: list[TraceRequest], **options: float) -> DrillResult:
    settings: dict[str, Any] = {"concurrency": 16, "transfer_failures": 4, "fault_after": 0.1, "seed": 7} | options
    return await run_drill(Drill(protocol, fault, **settings), trace)


def assert_nothing_hangs(result: DrillResult) -> None:
    assert result.outcomes["lost"] == 0, result.lost
    assert result.gateway_inflight == 0
    for left in result.left:
        assert (left.running, left.bootstrapping) == (0, 0), left
        if left.held == 0:
            assert left.handoffs == 0, left


PREFILL_HUNG = 2
"""Legs the dying prefill engine hangs before it dies: one a DP rank (the drill's engines have two)."""


def lease_held(result: DrillResult) -> int:
    return sum(left.held for left in result.left)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_prefill_engine_dying_under_load_loses_nothing(protocol: Protocol, trace: list[TraceRequest]) -> None:
    # a leg hangs on each of the victim's two DP ranks, then it dies: a load-aware placement sends a rank with a
    # hung leg nothing more while the other prefill engine has room, so a third hung leg is not certain to come
    # (on a loaded machine the trace could end first)
    result = await drill(protocol, "kill_prefill", trace, hang_first=PREFILL_HUNG)
    seen = result.summary()
    assert result.faults_injected == 1 and result.in_flight_at_fault >= PREFILL_HUNG, seen
    assert result.outcomes["completed"] == REQUESTS, seen  # every leg that died was retried on the surviving pairs
    # a prefill leg dying after its decode began is counted, not retried
    assert PREFILL_HUNG <= result.retries <= result.leg_failures, seen
    assert_nothing_hangs(result)
    assert lease_held(result) == 0  # the decode legs of the dead prefill were cancelled, not left waiting


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_decode_engine_dying_under_load_loses_nothing(protocol: Protocol, trace: list[TraceRequest]) -> None:
    # the engine hangs six legs, then dies: more legs fail at once than half the retry throttle's tokens (here 8),
    # but the failures of an engine already known dead take none, so all of them are retried
    result = await drill(protocol, "kill_decode", trace, retry_throttle_tokens=8, hang_first=6)
    assert result.faults_injected == 1 and result.in_flight_at_fault >= 6
    # every request completed, but a stream the dead decode had begun: its client got an error event
    assert set(result.errors_by_status) <= {"stream"}
    assert result.outcomes["completed"] + result.errors_by_status["stream"] == REQUESTS
    assert result.leg_failures > 0
    assert_nothing_hangs(result)
    if protocol == "sglang":
        assert lease_held(result) == 0  # its prefill legs were cancelled and freed their KV


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_broken_kv_transfers_under_load_are_retried(protocol: Protocol, trace: list[TraceRequest]) -> None:
    result = await drill(protocol, "transfer_fail", trace)
    seen, broken = result.summary(), result.faults_injected
    assert 1 <= broken <= 4, seen  # the next four decode legs on that engine, or as many as it gets
    assert result.outcomes["completed"] == REQUESTS, seen
    assert result.leg_failures == broken and result.retries == broken, seen
    assert_nothing_hangs(result)
    # SGLang's prefill is told and fails the room; a vLLM prefill keeps the KV its decode never pulled
    assert lease_held(result) == (0 if protocol == "sglang" else broken), seen


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_decode_leg_breaking_after_its_first_byte_ends_its_stream_with_an_error_and_frees_both_pools(
    protocol: Protocol, trace: list[TraceRequest]
) -> None:
    result = await drill(protocol, "decode_crash", trace)
    seen, broken = result.summary(), result.faults_injected
    assert 1 <= broken <= 4, seen  # the next four decode legs on that engine, or as many as it gets
    # a streamed client already has bytes: it gets an error event (never a silent end); an assembled answer is
    # read whole within its attempt, so it is retried
    assert set(result.errors_by_status) <= {"stream"}, seen
    assert result.outcomes["completed"] + result.errors_by_status["stream"] == REQUESTS, seen
    assert result.retries == broken - result.errors_by_status["stream"], seen
    assert result.leg_failures == broken, seen  # the streams broken after their first byte are counted too
    assert_nothing_hangs(result)
    assert lease_held(result) == 0  # the KV had moved before the decode began


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_clients_hanging_up_mid_stream_under_load_abort_both_legs(
    protocol: Protocol, trace: list[TraceRequest]
) -> None:
    result = await drill(protocol, "disconnect", trace)
    assert result.outcomes["disconnected"] > 0
    assert result.outcomes["completed"] + result.outcomes["disconnected"] == REQUESTS
    assert_nothing_hangs(result)
    assert lease_held(result) == 0


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_with_no_decode_engine_left_clients_get_openai_errors(
    protocol: Protocol, trace: list[TraceRequest]
) -> None:
    # the first decode engine hangs three legs before both die, so that requests are in flight whatever the
    # machine's speed (without it a fast run could answer every request before the kill)
    result = await drill(protocol, "kill_all_decode", trace, hang_first=3)
    assert result.faults_injected == 2 and result.in_flight_at_fault >= 3
    assert result.outcomes["error"] > 0  # an HTTP error with an OpenAI error body, or a stream's error event
    assert set(result.errors_by_status) <= {"502", "503", "504", "stream"}
    assert result.outcomes["completed"] + result.outcomes["error"] == REQUESTS
    assert_nothing_hangs(result)
    assert {left.pool for left in result.left} == {"prefill"}
