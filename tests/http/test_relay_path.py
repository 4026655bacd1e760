"""The completion requests skip FastAPI's routing (GatewayApp's shortcut), yet FastAPI still documents the routes
and, reached through its router, they answer the same."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from gateway.config import EngineConfig, Settings, UpstreamConfig
from gateway.server.app import create_app
from gateway.serving import serve_in_background
from tests.helpers import CHAT, ECHO_MODEL, echo_engine, total


@contextlib.asynccontextmanager
async def gateway_app() -> AsyncIterator[FastAPI]:
    """The gateway app, its lifespan running, before an echo engine."""
    async with serve_in_background(echo_engine()) as url:
        settings = Settings(
            policy="round_robin",
            engines=[EngineConfig(name="e", flavor="vllm", url=url, dp_size=4, models=[ECHO_MODEL])],
            upstream=UpstreamConfig(stream_nonstreamed=False, stream_usage=False),
        )
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            yield app


def without_ids(answer: dict[str, Any]) -> dict[str, Any]:
    headers = {k: v for k, v in answer["echo_headers"].items() if k not in ("x-request-id", "x-data-parallel-rank")}
    return {**answer, "echo_headers": headers}


def test_the_openapi_document_describes_both_completion_routes() -> None:
    settings = Settings(engines=[EngineConfig(name="e", flavor="vllm", url="http://127.0.0.1:9", models=["m"])])
    paths = create_app(settings).openapi()["paths"]
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert paths[path]["post"]["requestBody"]["required"] is True


@pytest.mark.parametrize("stream", [False, True])
async def test_through_fastapis_router_a_completion_is_answered_as_through_the_shortcut(stream: bool) -> None:
    async with gateway_app() as app:

        async def through_router(scope: Scope, receive: Receive, send: Send) -> None:
            await FastAPI.__call__(app, scope, receive, send)  # the app without its shortcut

        answers = []
        for asgi in (app, through_router):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://gw") as client:
                answer = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
                assert answer.status_code == 200
                assert answer.headers["x-request-id"]
                answers.append(answer.text if stream else without_ids(answer.json()))
        assert answers[0] == answers[1]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            text = (await client.get("/metrics")).text
        assert total(text, "gateway_requests_total", route="chat", status="200") == 2
