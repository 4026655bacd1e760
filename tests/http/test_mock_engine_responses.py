"""The mock engines' Responses API with its store off (the engines' default) and with a rank pinned, in process."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.sim.mock_engine.app import MockEngineConfig, create_mock_engine_app

MODEL = "m"


async def _client(flavor: str, store: bool) -> AsyncIterator[httpx.AsyncClient]:
    app = create_mock_engine_app(MockEngineConfig(flavor, 2, model=MODEL, speed=50.0, response_store=store))  # type: ignore[arg-type]
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://engine") as client,
    ):
        yield client


@pytest.fixture
async def vllm_without_store() -> AsyncIterator[httpx.AsyncClient]:
    async for client in _client("vllm", store=False):
        yield client


@pytest.fixture
async def sglang_without_store() -> AsyncIterator[httpx.AsyncClient]:
    async for client in _client("sglang", store=False):
        yield client


async def test_vllm_without_its_store_answers_but_forgets(vllm_without_store: httpx.AsyncClient) -> None:
    made = await vllm_without_store.post("/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 2})
    assert made.status_code == 200
    rid = made.json()["id"]
    follow = await vllm_without_store.post(
        "/v1/responses", json={"model": MODEL, "input": "x", "previous_response_id": rid}
    )
    assert follow.status_code == 404
    assert follow.json()["error"]["message"] == f"Response with id '{rid}' not found."
    assert (await vllm_without_store.get(f"/v1/responses/{rid}")).status_code == 404


async def test_sglang_without_its_store_refuses_stateful_calls(sglang_without_store: httpx.AsyncClient) -> None:
    follow = await sglang_without_store.post(
        "/v1/responses", json={"model": MODEL, "input": "x", "previous_response_id": "resp_1"}
    )
    assert follow.status_code == 400 and "Response store is disabled" in follow.json()["error"]["message"]
    assert (await sglang_without_store.get("/v1/responses/resp_1")).status_code == 400


@pytest.mark.parametrize(("flavor", "pin"), [("vllm", {"headers": {"X-data-parallel-rank": "1"}}), ("sglang", {})])
async def test_a_pinned_response_is_counted_on_its_rank(flavor: str, pin: dict[str, object]) -> None:
    async for client in _client(flavor, store=True):
        body: dict[str, object] = {"model": MODEL, "input": "hi", "max_output_tokens": 1}
        if flavor == "sglang":
            body["routed_dp_rank"] = 1
        made = await client.post("/v1/responses", json=body, **pin)  # type: ignore[arg-type]
        assert made.status_code == 200
        seen = (await client.get("/_sim/requests")).json()
        assert seen["responses"]["created"] == [0, 1] and seen["pinned"] == [0, 1]
        bad = await client.post(
            "/v1/responses", json={**body, "routed_dp_rank": 5}, headers={"X-data-parallel-rank": "5"}
        )
        assert bad.status_code == 400
