"""The Responses API through the gateway with the official ``openai`` client, against both mock flavours:
create (streamed and not), ``previous_response_id`` follow-ups on the rank that stores the conversation (shown by
the mocks' per-rank counters), retrieve, cancel, delete, the gateway's own 404 for a response whose engine it does
not know, and its 400s for bad bodies."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import EngineConfig, SchedulerServiceConfig, ScrapeConfig, Settings
from gateway.scheduler_service.service import running_service
from gateway.server.app import create_app
from gateway.serving import serve_in_background
from gateway.sim.cluster import running_gateway
from gateway.sim.mock_engine.app import MockEngineConfig, create_mock_engine_app
from gateway.sim.mock_engine.protocol import TOKEN_TEXT
from gateway.telemetry import sum_samples
from tests.helpers import MODEL, eventually

FIXED = {"ignore_eos": True}
DP = 4


@dataclass
class Setup:
    gateway_url: str
    engine_url: str
    flavor: str

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.gateway_url + "/v1", api_key="unused", max_retries=0)

    async def counters(self) -> dict[str, list[int]]:
        async with httpx.AsyncClient() as http:
            seen = (await http.get(self.engine_url + "/_sim/requests")).json()
        return seen["responses"]  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def _setup(flavor: str, policy: str = "sbs") -> AsyncIterator[Setup]:
    mock = MockEngineConfig(flavor, DP, model=MODEL, speed=20.0, response_store=True)  # type: ignore[arg-type]
    async with serve_in_background(create_mock_engine_app(mock)) as url:
        engine = EngineConfig(name="e", flavor=flavor, url=url, dp_size=DP, models=[MODEL])  # type: ignore[arg-type]
        settings = Settings(policy=policy, engines=[engine], scrape=ScrapeConfig(interval_s=0.1, timeout_s=1.0))  # type: ignore[arg-type]
        async with running_gateway(settings) as gateway_url:
            yield Setup(gateway_url, url, flavor)


@pytest.fixture(params=["sglang", "vllm"])
async def setup(request: pytest.FixtureRequest) -> AsyncIterator[Setup]:
    async with _setup(request.param) as built:
        yield built


async def test_create_follow_up_retrieve_on_the_home_rank(setup: Setup) -> None:
    client = setup.client()
    first = await client.responses.create(model=MODEL, input="Hello there", max_output_tokens=5, extra_body=FIXED)
    assert first.id.startswith("resp_")
    assert first.output_text == TOKEN_TEXT * 5
    assert first.usage is not None and first.usage.output_tokens == 5 and first.usage.input_tokens > 0
    created = (await setup.counters())["created"]
    assert sum(created) == 1
    home = created.index(1)
    previous = first
    for turn in range(3):
        previous = await client.responses.create(
            model=MODEL,
            input=f"and then {turn}",
            previous_response_id=previous.id,
            max_output_tokens=4,
            extra_body=FIXED,
        )
        assert previous.previous_response_id is not None
        assert previous.usage is not None and previous.usage.input_tokens > first.usage.input_tokens
    counters = await setup.counters()
    assert counters["followups"] == [3 if rank == home else 0 for rank in range(DP)]
    assert counters["not_found"] == 0
    again = await client.responses.retrieve(first.id)
    assert again.id == first.id and again.output_text == first.output_text
    await client.close()


async def test_streamed_create_and_streamed_follow_up(setup: Setup) -> None:
    client = setup.client()
    stream = await client.responses.create(
        model=MODEL, input="Tell me", max_output_tokens=6, stream=True, extra_body=FIXED
    )
    events = [event async for event in stream]
    types = [event.type for event in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types.count("response.output_text.delta") == 6
    assert types[-1] == "response.incomplete"  # max_output_tokens cut it (ignore_eos)
    final = events[-1].response  # type: ignore[union-attr]
    assert final.usage is not None and final.usage.output_tokens == 6
    home = (await setup.counters())["created"].index(1)
    follow = await client.responses.create(
        model=MODEL, input="more", previous_response_id=final.id, stream=True, max_output_tokens=3, extra_body=FIXED
    )
    texts = [event.delta async for event in follow if event.type == "response.output_text.delta"]
    assert texts == [TOKEN_TEXT] * 3
    assert (await setup.counters())["followups"][home] == 1
    await client.close()


async def test_cancel_and_delete_are_relayed_to_the_home_engine(setup: Setup) -> None:
    client = setup.client()
    done = await client.responses.create(model=MODEL, input="x", max_output_tokens=2, extra_body=FIXED)
    if setup.flavor == "vllm":  # vLLM refuses to cancel a response that is not a background one
        with pytest.raises(openai.BadRequestError, match="Cannot cancel a synchronous response"):
            await client.responses.cancel(done.id)
    else:  # SGLang answers a finished response as it is
        assert (await client.responses.cancel(done.id)).id == done.id
    with pytest.raises(openai.APIStatusError) as refused:  # neither engine serves DELETE: its 405 is passed on
        await client.responses.delete(done.id)
    assert refused.value.status_code == 405
    await client.close()


async def test_unknown_response_is_the_gateways_own_404(setup: Setup) -> None:
    client = setup.client()
    with pytest.raises(openai.NotFoundError) as missing:
        await client.responses.retrieve("resp_neverseen")
    assert missing.value.code == "response_not_found"
    assert "does not know which engine" in missing.value.message
    with pytest.raises(openai.NotFoundError) as follow:
        await client.responses.create(model=MODEL, input="hi", previous_response_id="resp_neverseen")
    assert follow.value.code == "response_not_found" and follow.value.param == "previous_response_id"
    assert (await setup.counters())["not_found"] == 0  # no engine was asked
    await client.close()


async def test_front_doors_sharing_a_scheduler_service_share_where_responses_live() -> None:
    """Two front doors placing through one scheduler service (what ``--workers 2`` runs): a response created
    through one is followed up, retrieved and cancelled through the other, on the rank that stores it."""
    async with _setup("sglang") as first:
        engine = EngineConfig(name="e", flavor="sglang", url=first.engine_url, dp_size=DP, models=[MODEL])
        base = Settings(policy="sbs", engines=[engine], scrape=ScrapeConfig(interval_s=0.1, timeout_s=1.0))
        async with running_service(base, host="127.0.0.1") as (service, service_url):
            front = base.model_copy(
                update={"scheduler_service": SchedulerServiceConfig(url=service_url, deadline_s=2.0)}
            )
            async with running_gateway(front) as a_url, running_gateway(front) as b_url:
                a = openai.AsyncOpenAI(base_url=a_url + "/v1", api_key="unused", max_retries=0)
                b = openai.AsyncOpenAI(base_url=b_url + "/v1", api_key="unused", max_retries=0)
                made = await a.responses.create(model=MODEL, input="hi", max_output_tokens=2, extra_body=FIXED)
                streamed = await a.responses.create(model=MODEL, input="hey", max_output_tokens=2, stream=True)
                last = [event async for event in streamed][-1]
                assert len(service.state.response_homes) == 2
                follow = await b.responses.create(
                    model=MODEL, input="next", previous_response_id=made.id, max_output_tokens=2, extra_body=FIXED
                )
                await b.responses.create(
                    model=MODEL,
                    input="and",
                    previous_response_id=last.response.id,
                    max_output_tokens=2,  # type: ignore[union-attr]
                )
                assert (await b.responses.retrieve(made.id)).id == made.id
                assert (await b.responses.cancel(follow.id)).id == follow.id  # SGLang answers a finished one as is
                counters = await first.counters()
                assert counters["followups"] == counters["created"] and counters["not_found"] == 0  # each on its home

                async def the_service_counted_the_follow_ups_too() -> bool:  # 2 it placed, 2 it was told of
                    text = service.state.metrics.render().decode()
                    counted = sum_samples(text, "gateway_dispatched_requests_total") == 4
                    return counted and service.state.view.inflight_count() == 0  # and their ends

                await eventually(the_service_counted_the_follow_ups_too)
                for client in (a, b):
                    await client.close()


async def test_gateways_without_a_shared_service_do_not_know_each_others_responses() -> None:
    """Two separate gateways in front of one engine: a follow-up that reaches the other one is answered 404
    ``response_not_found`` by it, not sent to an engine at random."""
    async with _setup("vllm") as first:
        settings = Settings(
            policy="round_robin",
            engines=[EngineConfig(name="e", flavor="vllm", url=first.engine_url, dp_size=DP, models=[MODEL])],
        )
        async with running_gateway(settings) as other_url:
            client = first.client()
            made = await client.responses.create(model=MODEL, input="hi", max_output_tokens=2, extra_body=FIXED)
            other = openai.AsyncOpenAI(base_url=other_url + "/v1", api_key="unused", max_retries=0)
            with pytest.raises(openai.NotFoundError) as missing:
                await other.responses.create(model=MODEL, input="next", previous_response_id=made.id)
            assert missing.value.code == "response_not_found"
            await client.close()
            await other.close()


async def test_removed_engine_gives_404_not_another_engines_answer() -> None:
    mock = MockEngineConfig("sglang", 2, model=MODEL, speed=20.0, response_store=True)
    async with serve_in_background(create_mock_engine_app(mock)) as url:
        engines = [EngineConfig(name=n, flavor="sglang", url=url, dp_size=2, models=[MODEL]) for n in ("a", "b")]
        app = create_app(Settings(policy="round_robin", engines=engines))
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as http,
        ):
            made = (
                await http.post("/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 2})
            ).json()
            state = app.state.gateway
            home = state.response_homes.lookup(made["id"], state.clock())
            assert home is not None
            name = home.rank.engine
            assert (await http.delete(f"/admin/engines/{name}")).status_code == 200  # nothing in flight there
            assert state.response_homes.lookup(made["id"], state.clock()) is None, "forgotten with its engine"
            # an engine of the same name added again is another process: it does not have the response either
            again = next(e for e in engines if e.name == name).model_dump(mode="json")
            assert (await http.post("/admin/engines", json=again)).status_code == 201
            follow = await http.post(
                "/v1/responses", json={"model": MODEL, "input": "next", "previous_response_id": made["id"]}
            )
            assert follow.status_code == 404
            assert follow.json()["error"]["code"] == "response_not_found"
            assert (await http.get(f"/v1/responses/{made['id']}")).status_code == 404


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL}, "input"),
        ({"model": MODEL, "input": 5}, "input"),
        ({"model": MODEL, "input": []}, "input"),
        ({"model": MODEL, "input": [3]}, "input[0]"),
        ({"input": "hi"}, "model"),
        ({"model": MODEL, "input": "hi", "stream": "yes"}, "stream"),
        ({"model": MODEL, "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": MODEL, "input": "hi", "max_output_tokens": "ten"}, "max_output_tokens"),
        ({"model": MODEL, "input": "hi", "instructions": ["a"]}, "instructions"),
        ({"model": MODEL, "input": "hi", "previous_response_id": 7}, "previous_response_id"),
    ],
)
async def test_bad_bodies_get_an_openai_400(body: dict[str, object], param: str) -> None:
    async with _setup("vllm", "round_robin") as built, httpx.AsyncClient(base_url=built.gateway_url) as http:
        answer = await http.post("/v1/responses", json=body)
        assert answer.status_code == 400
        error = answer.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param
        assert sum((await built.counters())["created"]) == 0


async def test_metrics_count_responses_and_openapi_lists_the_routes(setup: Setup) -> None:
    client = setup.client()
    await client.responses.create(model=MODEL, input="hi", max_output_tokens=2, extra_body=FIXED)
    async with httpx.AsyncClient(base_url=setup.gateway_url) as http:
        text = (await http.get("/metrics")).text
        paths = (await http.get("/openapi.json")).json()["paths"]
    counted = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "gateway_requests_total" and s.labels["route"] == "responses" and s.labels["status"] == "200"
    ]
    assert counted == [1.0]
    assert "post" in paths["/v1/responses"]
    assert set(paths["/v1/responses/{response_id}"]) == {"get", "delete"}
    assert "post" in paths["/v1/responses/{response_id}/cancel"]
    assert "input" in paths["/v1/responses"]["post"]["requestBody"]["content"]["application/json"]["schema"]["required"]
    await client.close()


async def test_pd_models_are_refused_with_501() -> None:
    engines = [
        EngineConfig(name="p", flavor="sglang", url="http://127.0.0.1:9", dp_size=2, models=[MODEL], role="prefill"),
        EngineConfig(name="d", flavor="sglang", url="http://127.0.0.1:9", dp_size=2, models=[MODEL], role="decode"),
    ]
    app = create_app(Settings(policy="round_robin", engines=engines))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as http,
    ):
        answer = await http.post("/v1/responses", json={"model": MODEL, "input": "hi"})
    assert answer.status_code == 501
    assert answer.json()["error"]["code"] == "not_implemented"
