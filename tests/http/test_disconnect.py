"""A client that goes away takes its request with it: out of the window, or aborted on the engine."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.config import Settings, WindowConfig
from gateway.sim.cluster import SimulatedEngine, running_gateway, simulated_engines
from tests.helpers import eventually, total

MODEL = "m"
SLOW = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000, "ignore_eos": True}


@contextlib.asynccontextmanager
async def gateway_and_engine(window: WindowConfig | None = None) -> AsyncIterator[tuple[str, str]]:
    """A gateway with the ``sbs`` policy and ``window`` in front of one simulated vLLM engine of 2 ranks, in real
    time; yields both base URLs."""
    async with simulated_engines([SimulatedEngine("e", "vllm", 2, MODEL)], speed=1.0) as engines:
        settings = Settings(policy="sbs", window=window or WindowConfig(), engines=engines)
        async with running_gateway(settings) as gateway_url:
            yield gateway_url, engines[0].url


@pytest.mark.parametrize("stream", [False, True])
async def test_engine_aborts_when_the_client_leaves_mid_request(stream: bool) -> None:
    async with gateway_and_engine() as (gateway_url, engine_url), httpx.AsyncClient() as http:
        body = {**SLOW, "stream": stream}
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=0.5)) as impatient:
            if stream:  # read a few tokens, then hang up
                async with impatient.stream("POST", gateway_url + "/v1/chat/completions", json=body) as r:
                    chunks = 0
                    async for _ in r.aiter_raw():
                        chunks += 1
                        if chunks == 3:
                            break
            else:  # give up waiting for the whole answer
                with pytest.raises(httpx.ReadTimeout):
                    await impatient.post(gateway_url + "/v1/chat/completions", json=body)

        async def engine_aborted() -> bool:
            text = (await http.get(engine_url + "/metrics")).text
            aborted = total(text, "vllm:request_success_total", finished_reason="abort")
            return aborted == 1 and total(text, "vllm:num_requests_running") == 0

        async def gateway_forgot_it() -> bool:
            text = (await http.get(gateway_url + "/metrics")).text
            return total(text, "gateway_inflight_requests") == 0

        await eventually(engine_aborted)
        await eventually(gateway_forgot_it)
        if not stream:
            text = (await http.get(gateway_url + "/metrics")).text
            assert total(text, "gateway_requests_total", status="client_closed") == 1


async def test_a_request_waiting_in_the_window_is_dropped_when_its_client_leaves() -> None:
    # ticks lie on a grid: with 600 s windows the next tick is (almost surely) far beyond the client's patience
    window = WindowConfig(min_interval_s=600.0, max_interval_s=600.0, close_when_idle=False, hold_min_arrivals=None)
    async with gateway_and_engine(window) as (gateway_url, engine_url), httpx.AsyncClient() as http:
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=0.3)) as impatient:
            with pytest.raises(httpx.ReadTimeout):
                await impatient.post(gateway_url + "/v1/chat/completions", json=SLOW)

        async def client_gone() -> bool:
            text = (await http.get(gateway_url + "/metrics")).text
            return total(text, "gateway_requests_total", status="client_closed") == 1

        await eventually(client_gone)
        gateway_text = (await http.get(gateway_url + "/metrics")).text
        engine_text = (await http.get(engine_url + "/metrics")).text
        assert total(gateway_text, "gateway_window_buffered_requests") == 0
        assert total(gateway_text, "gateway_dispatched_requests_total") == 0
        assert total(engine_text, "vllm:prompt_tokens_total") == 0


async def test_a_full_window_answers_503_with_retry_after_at_once() -> None:
    window = WindowConfig(
        min_interval_s=600.0,
        max_interval_s=600.0,
        max_buffered_requests=2,
        close_when_idle=False,
        hold_min_arrivals=None,
    )
    async with gateway_and_engine(window) as (gateway_url, _), httpx.AsyncClient() as http:

        async def waits() -> None:  # held in the window until cancelled below
            async with httpx.AsyncClient(timeout=60) as patient:
                await patient.post(gateway_url + "/v1/chat/completions", json=SLOW)

        holders = [asyncio.create_task(waits()) for _ in range(2)]

        async def window_full() -> bool:
            text = (await http.get(gateway_url + "/metrics")).text
            return total(text, "gateway_window_buffered_requests") == 2

        await eventually(window_full)
        refused = await http.post(gateway_url + "/v1/chat/completions", json=SLOW)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "window_full"
        for holder in holders:
            holder.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
