"""Tenants over HTTP: keys name tenants, flat keys keep working, the priority header is checked, rate limits answer
429 with ``Retry-After`` and are counted, and each class's TTFT is exported."""

from __future__ import annotations

import httpx
from pydantic import SecretStr

from gateway.config import SecurityConfig, TenantConfig, TenantsConfig
from gateway.telemetry import sum_samples
from tests.helpers import CHAT, MODEL, gateway_before, running_cluster

TENANTS = TenantsConfig(
    priority_header="x-priority",
    tenants=[
        TenantConfig(name="chat", api_keys=["sk-chat"], priority="interactive"),
        TenantConfig(name="etl", api_keys=["sk-etl"], priority="batch", requests_per_minute=2),
    ],
)


def bearer(key: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **headers}


async def test_tenant_keys_classes_and_rate_limits() -> None:
    security = SecurityConfig(api_keys=["sk-flat"])
    async with gateway_before("vllm", policy="sbs", security=security, tenants=TENANTS) as client:
        for key in ("sk-flat", "sk-chat", "sk-etl"):
            r = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
            assert r.status_code == 200, (key, r.text)
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-nobody"))).status_code == 401

        assert (await client.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-etl"))).status_code == 200
        r = await client.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-etl"))  # the third in a minute
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "rate_limit_exceeded" and r.json()["error"]["type"] == "requests"
        assert 1 <= int(r.headers["retry-after"]) <= 30
        assert len(r.headers["x-request-id"]) == 32

        r = await client.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-chat", **{"x-priority": "gold"}))
        assert r.status_code == 400 and r.json()["error"]["param"] == "x-priority", r.text
        r = await client.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-flat", **{"x-priority": "high"}))
        assert r.status_code == 400
        r = await client.post(
            "/v1/chat/completions", json=CHAT, headers=bearer("sk-flat", **{"x-priority": "interactive"})
        )
        assert r.status_code == 400 and "may only lower" in r.json()["error"]["message"]
        r = await client.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-chat", **{"x-priority": "batch"}))
        assert r.status_code == 200

        text = (await client.get("/metrics")).text
        assert sum_samples(text, "gateway_rate_limited_total", tenant="etl", limit="requests") == 1
        assert sum_samples(text, "gateway_class_ttft_seconds_count", priority="interactive") == 1
        assert sum_samples(text, "gateway_class_ttft_seconds_count", priority="standard") == 1
        assert sum_samples(text, "gateway_class_ttft_seconds_count", priority="batch") == 3


async def test_without_tenants_nothing_is_limited_or_classed() -> None:
    async with gateway_before("vllm", policy="sbs") as client:
        r = await client.post("/v1/chat/completions", json=CHAT, headers={"x-priority": "nonsense"})
        assert r.status_code == 200
        text = (await client.get("/metrics")).text
        assert "gateway_class_ttft_seconds_count{" not in text
        assert isinstance(client, httpx.AsyncClient)


async def test_the_tokens_a_minute_are_settled_with_what_the_answer_used() -> None:
    # 60 tokens a minute: one a second. The first request takes its prompt estimate (2 tokens) but streams 40
    # output tokens. The second's prompt (about 125 tokens) waits for a full bucket of 60: settled, 42 s away;
    # taken at admission only, 2 s.
    tenants = TenantsConfig(tenants=[TenantConfig(name="t", api_keys=[SecretStr("sk-t")], tokens_per_minute=60)])
    async with (
        running_cluster("sbs", tenants=tenants) as cluster,
        httpx.AsyncClient(base_url=cluster.gateway_url, timeout=10, headers=bearer("sk-t")) as client,
    ):
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 40, "ignore_eos": True, "stream": True}
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
        r = await client.post("/v1/completions", json={**body, "prompt": "word " * 100, "max_tokens": 1})
        assert r.status_code == 429 and r.json()["error"]["type"] == "tokens", r.text
        assert 30 <= int(r.headers["retry-after"]) <= 45
