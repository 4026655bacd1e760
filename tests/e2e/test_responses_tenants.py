"""Tenants on the Responses API, with the official ``openai`` client against a gateway on loopback in front of a mock
engine with its store on: a tenant over its requests limit gets 429 with ``Retry-After`` on create, follow-up
and retrieve; the tokens bucket is settled with the response's reported usage; the class TTFT histogram and the
virtual token counter see Responses calls, follow-ups placed on their home rank included.

The front door's clock is frozen once the gateway is up, so the buckets never refill during a test and every
``Retry-After`` is exact (the dispatcher keeps its own clock; a request's arrival, read on the frozen clock, only
looks older to it)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import openai
import pytest
from pydantic import SecretStr

from gateway.config import EngineConfig, ScrapeConfig, Settings, TenantConfig, TenantsConfig
from gateway.server.app import create_app
from gateway.server.responses import input_messages
from gateway.server.state import GatewayState
from gateway.serving import serve_in_background
from gateway.sim.mock_engine.app import MockEngineConfig, create_mock_engine_app
from gateway.telemetry import sum_samples
from tests.helpers import MODEL

FIXED = {"ignore_eos": True}


def _tenant(name: str, **limits: float) -> TenantConfig:
    return TenantConfig(name=name, api_keys=[SecretStr(f"sk-{name}")], priority="batch", **limits)  # type: ignore[arg-type]


@dataclass
class Gateway:
    state: GatewayState
    url: str

    def client(self, tenant: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=f"sk-{tenant}", max_retries=0)

    async def metrics(self) -> str:
        async with httpx.AsyncClient() as http:
            return (await http.get(self.url + "/metrics")).text


@contextlib.asynccontextmanager
async def _gateway(flavor: str, *tenants: TenantConfig) -> AsyncIterator[Gateway]:
    mock = MockEngineConfig(flavor, 2, model=MODEL, speed=20.0, response_store=True)  # type: ignore[arg-type]
    async with serve_in_background(create_mock_engine_app(mock)) as url:
        engine = EngineConfig(name="e", flavor=flavor, url=url, dp_size=2, models=[MODEL])  # type: ignore[arg-type]
        settings = Settings(
            policy="sbs",
            engines=[engine],
            scrape=ScrapeConfig(interval_s=0.1, timeout_s=1.0),
            tenants=TenantsConfig(tenants=list(tenants)),
        )
        app = create_app(settings)
        async with serve_in_background(app) as gateway_url:
            state: GatewayState = app.state.gateway
            frozen = state.clock()
            state.clock = lambda: frozen
            yield Gateway(state, gateway_url)


@pytest.mark.parametrize("flavor", ["sglang", "vllm"])
async def test_a_tenant_over_its_requests_limit_gets_429_on_every_responses_call(flavor: str) -> None:
    async with _gateway(flavor, _tenant("etl", requests_per_minute=4), _tenant("other")) as gateway:
        client = gateway.client("etl")
        first = await client.responses.create(model=MODEL, input="hi", max_output_tokens=3, extra_body=FIXED)
        stream = await client.responses.create(
            model=MODEL, input="on", previous_response_id=first.id, max_output_tokens=2, stream=True, extra_body=FIXED
        )
        assert [e.type async for e in stream][-1] == "response.incomplete"
        await client.responses.retrieve(first.id)
        await client.responses.retrieve(first.id)  # the fourth request of the minute

        with pytest.raises(openai.RateLimitError) as refused:
            await client.responses.create(model=MODEL, input="more", max_output_tokens=1)
        assert refused.value.code == "rate_limit_exceeded"
        assert refused.value.response.headers["retry-after"] == "15"  # 1 request at 4 a minute, the bucket empty
        with pytest.raises(openai.RateLimitError):
            await client.responses.create(model=MODEL, input="more", previous_response_id=first.id)
        with pytest.raises(openai.RateLimitError) as refused:
            await client.responses.retrieve(first.id)
        assert refused.value.response.headers["retry-after"] == "15"
        other = gateway.client("other")
        assert (await other.responses.retrieve(first.id)).id == first.id  # another tenant is not limited
        await other.close()

        text = await gateway.metrics()
        assert sum_samples(text, "gateway_rate_limited_total", tenant="etl", limit="requests") == 3
        assert sum_samples(text, "gateway_requests_total", route="responses", status="429") == 3
        # the create (answered whole) and the streamed follow-up; retrievals generate no first token
        assert sum_samples(text, "gateway_class_ttft_seconds_count", priority="batch") == 2
        await client.close()


async def _create(client: openai.AsyncOpenAI, stream: bool, **fields: object) -> openai.types.responses.Response:
    """A response, streamed or not (the streamed one is its terminal event's)."""
    if not stream:
        return await client.responses.create(model=MODEL, extra_body=FIXED, **fields)  # type: ignore[call-overload,no-any-return]
    events = await client.responses.create(model=MODEL, extra_body=FIXED, stream=True, **fields)  # type: ignore[call-overload]
    return [e async for e in events][-1].response  # type: ignore[no-any-return]


@pytest.mark.parametrize("stream", [False, True])
async def test_the_tokens_bucket_is_settled_with_the_responses_usage(stream: bool) -> None:
    # 60 tokens a minute, the bucket frozen full. A response and its follow-up each take their prompt estimate at
    # admission and report input_tokens + 10 output tokens; the follow-up's input_tokens include the stored
    # conversation, which its estimate cannot see. A prompt over 60 tokens then waits for a full bucket: Retry-After
    # is what the two used by their usage (taken at admission only, or settled on the estimates, it would be less).
    async with _gateway("vllm", _tenant("t", tokens_per_minute=60)) as gateway:
        client = gateway.client("t")

        def estimate(text: str) -> int:
            return gateway.state.prompt_counter.count(MODEL, {"messages": input_messages(text, None)})

        first_estimate = estimate("hello")
        first = await _create(client, stream, input="hello", max_output_tokens=10)
        follow_estimate = estimate("more")
        follow = await _create(client, stream, input="more", previous_response_id=first.id, max_output_tokens=10)
        assert first.usage is not None and follow.usage is not None
        assert first.usage.output_tokens == follow.usage.output_tokens == 10
        used = first.usage.input_tokens + follow.usage.input_tokens + 20
        assert used > first_estimate + follow_estimate + 20
        with pytest.raises(openai.RateLimitError) as refused:
            await client.responses.create(model=MODEL, input="word " * 100, max_output_tokens=1)
        assert refused.value.type == "tokens"
        assert refused.value.response.headers["retry-after"] == str(used)  # 1 token a second, the bucket frozen
        await client.close()


async def test_the_virtual_token_counter_charges_responses_and_their_follow_ups() -> None:
    # Default weights: a prompt token 1, an output token 2. The create goes through the window; the follow-ups are
    # placed on their home rank (place_on) and charged all the same, the non-streamed one its reported output.
    async with _gateway("sglang", _tenant("etl")) as gateway:
        state, client = gateway.state, gateway.client("etl")
        fairness = state.dispatcher.scheduler.fairness
        assert fairness is not None

        def estimate(text: str) -> int:
            return state.prompt_counter.count(MODEL, {"messages": input_messages(text, None)})

        expected = float(estimate("Tell me") + 2 * 5)
        stream = await client.responses.create(
            model=MODEL, input="Tell me", max_output_tokens=5, stream=True, extra_body=FIXED
        )
        first = [e async for e in stream][-1].response  # type: ignore[union-attr]
        assert fairness.counter("etl") == expected

        expected += estimate("more") + 2 * 3
        stream = await client.responses.create(
            model=MODEL, input="more", previous_response_id=first.id, max_output_tokens=3, stream=True, extra_body=FIXED
        )
        assert [e.type async for e in stream].count("response.output_text.delta") == 3
        assert fairness.counter("etl") == expected

        expected += estimate("and more") + 2 * 4
        await client.responses.create(
            model=MODEL, input="and more", previous_response_id=first.id, max_output_tokens=4, extra_body=FIXED
        )
        assert fairness.counter("etl") == expected
        assert fairness.counter("default") == 0
        await client.close()
