"""API keys (which endpoint needs which key, 401s, keys from files and the environment, never logged) and the
header rules (nothing the client sends reaches the engine but the body; nothing the engine sends but the body and
its content type reaches the client)."""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from gateway.config import ConfigError, EngineConfig, SecurityConfig, Settings, load_settings
from gateway.server.auth import KeyRing, key_rings, read_key_file
from gateway.server.headers import HOP_BY_HOP_HEADERS
from gateway.serving import serve_in_background
from gateway.sim.cluster import running_gateway
from tests.helpers import CHAT, ECHO_MODEL, captured_logs, gateway_before

MODEL = ECHO_MODEL
API_KEY = "sk-test-api-0123456789"
ADMIN_KEY = "sk-test-admin-9876543210"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@contextlib.asynccontextmanager
async def secured(**security: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway_before("vllm", security=SecurityConfig(**security)) as client:
        yield client


def assert_401(r: httpx.Response) -> None:
    assert r.status_code == 401, f"expected 401, got {r.status_code}: {r.text}"
    assert r.json() == {
        "error": {
            "message": r.json()["error"]["message"],
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    assert r.headers["www-authenticate"] == "Bearer"
    assert len(r.headers["x-request-id"]) == 32


async def test_without_keys_every_endpoint_is_open() -> None:
    async with secured() as client:
        for path in ("/v1/models", "/metrics", "/admin/state", "/openapi.json", "/health"):
            r = await client.get(path)
            assert r.status_code == 200, f"{path}: {r.status_code} {r.text}"
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_api_key_guards_the_openai_endpoints() -> None:
    async with secured(api_keys=[API_KEY, "sk-other"]) as client:
        assert_401(await client.post("/v1/chat/completions", json=CHAT))
        assert_401(await client.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-wrong")))
        assert_401(await client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Basic {API_KEY}"}))
        assert_401(await client.get("/v1/models", headers=bearer(API_KEY[:-1])))
        assert_401(await client.get("/v2/unknown"))  # unknown paths do not tell what exists
        r = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(API_KEY))
        assert r.status_code == 200, r.text
        assert (await client.get("/v1/models", headers=bearer("sk-other"))).status_code == 200
        # probes and Prometheus need no key by default
        for path in ("/health", "/ready", "/metrics"):
            assert (await client.get(path)).status_code == 200, path
        # with API keys alone, the admin endpoints need one of them
        assert_401(await client.get("/admin/state"))
        assert (await client.get("/admin/state", headers=bearer(API_KEY))).status_code == 200


async def test_admin_key_guards_admin_endpoints_and_opens_the_api() -> None:
    async with secured(api_keys=[API_KEY], admin_keys=[ADMIN_KEY], metrics_auth="admin") as client:
        for path in ("/admin/state", "/openapi.json", "/docs", "/metrics"):
            assert_401(await client.get(path))
            assert_401(await client.get(path, headers=bearer(API_KEY)))
            r = await client.get(path, headers=bearer(ADMIN_KEY))
            assert r.status_code == 200, f"{path}: {r.status_code} {r.text}"
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=bearer(ADMIN_KEY))).status_code == 200
        assert (await client.get("/health")).status_code == 200
        state = (await client.get("/admin/state", headers=bearer(ADMIN_KEY))).json()
    assert state["policy"] == "round_robin"
    assert [(r["engine"], r["rank"]) for r in state["ranks"]] == [("e", i) for i in range(4)]
    assert state["engines"] == {"e": {"reachable": True}}


async def test_the_clients_key_is_not_forwarded_to_the_engine() -> None:
    async with secured(api_keys=[API_KEY]) as client:
        r = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(API_KEY))
    assert r.status_code == 200, r.text
    assert "authorization" not in r.json()["echo_headers"]


def test_key_files_skip_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# team A\nsk-a\n\n   sk-b  \n#sk-disabled\n", encoding="utf-8")
    assert read_key_file(path) == ["sk-a", "sk-b"]
    api, admin = key_rings(SecurityConfig(api_keys=["sk-env"], api_keys_file=path))  # type: ignore[list-item]
    assert [api.matches(k) for k in ("sk-a", "sk-b", "sk-env", "sk-disabled", "#sk-disabled", "")] == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]
    assert not admin


def test_keys_come_from_the_environment_and_never_show_in_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_SECURITY__API_KEYS", f'["{API_KEY}"]')
    settings = load_settings(security={"admin_keys": [ADMIN_KEY]})
    api, admin = key_rings(settings.security)
    assert api.matches(API_KEY) and admin.matches(ADMIN_KEY) and not api.matches(ADMIN_KEY)
    for shown in (repr(settings), str(settings), settings.model_dump_json(), repr(api), repr(admin)):
        assert API_KEY not in shown and ADMIN_KEY not in shown
    with pytest.raises(ConfigError, match="api_keys_file"):
        load_settings(security={"api_keys_file": str(tmp_path / "missing")})


def test_every_key_is_compared_whatever_matches_first() -> None:
    """Constant time: the comparison count does not depend on where (or whether) the key matches."""
    calls = []

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return hmac.compare_digest(a, b)

    ring = KeyRing(["first", "a-much-longer-second-key", "third"], compare=counting)
    for presented, expected in (("first", True), ("third", True), ("nope", False), ("x" * 500, False)):
        calls.clear()
        assert ring.matches(presented) is expected
        assert calls == [(32, 32)] * 3, f"{presented!r}: {calls}"  # SHA-256 digests: lengths never differ


async def test_keys_and_prompts_are_never_logged() -> None:
    secret_prompt = "PROMPT-MARKER-7f3a"
    messages = [{"role": "user", "content": secret_prompt}]
    with captured_logs() as logs:
        async with secured(api_keys=[API_KEY], admin_keys=[ADMIN_KEY]) as client:
            await client.post("/v1/chat/completions", json={**CHAT, "messages": messages}, headers=bearer(API_KEY))
            await client.post("/v1/chat/completions", json={**CHAT, "messages": messages}, headers=bearer("sk-guess"))
            await client.post(
                "/v1/chat/completions",
                json={**CHAT, "messages": messages, "stream": True, "fail": "mid-stream"},
                headers=bearer(ADMIN_KEY),
            )
            await client.post(
                "/v1/chat/completions", json={**CHAT, "messages": messages, "max_tokens": -1}, headers=bearer(API_KEY)
            )
    text = logs.getvalue()
    assert '"gateway.access"' in text and "stream" in text  # the requests were logged...
    for secret in (secret_prompt, API_KEY, ADMIN_KEY, "sk-guess"):
        assert secret not in text, f"{secret!r} appears in the logs"  # ...without what they carried


def header_engine() -> FastAPI:
    """An engine that echoes what reached it and answers with hop-by-hop and private headers of its own."""
    app = FastAPI()

    async def handle(request: Request) -> JSONResponse:
        headers = {
            "Keep-Alive": "timeout=99",
            "Upgrade": "h2c",
            "Trailer": "X-Checksum",
            "Proxy-Authenticate": "Basic",
            "Set-Cookie": "engine-session=1",
            "X-Engine-Internal": "rank-secret",
        }
        return JSONResponse(
            {"path": request.url.path, "query": request.url.query, "headers": dict(request.headers)}, headers=headers
        )

    app.add_api_route("/v1/chat/completions", handle, methods=["POST"])
    app.add_api_route("/metrics", lambda: PlainTextResponse(""), methods=["GET"])
    app.add_api_route("/health", lambda: PlainTextResponse(""), methods=["GET"])
    return app


async def test_hop_by_hop_and_client_headers_do_not_cross_and_the_client_cannot_pick_the_upstream() -> None:
    async with contextlib.AsyncExitStack() as exits:
        engine_url = await exits.enter_async_context(serve_in_background(header_engine()))
        settings = Settings(
            policy="round_robin", engines=[EngineConfig(name="e", flavor="vllm", url=engine_url, models=[MODEL])]
        )
        gateway_url = await exits.enter_async_context(running_gateway(settings))
        client = await exits.enter_async_context(httpx.AsyncClient(base_url=gateway_url, timeout=10))
        sent_headers = {
            "Connection": "keep-alive, X-Private",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic c2VjcmV0",
            "Proxy-Connection": "keep-alive",
            "X-Private": "1",
            "Cookie": "session=abc",
            "X-Forwarded-Host": "evil.example",
            "X-Forwarded-For": "10.9.9.9",
            "X-data-parallel-rank": "3",
            "Host": "evil.example:9999",
        }
        r = await client.post(
            "/v1/chat/completions?url=http://127.0.0.2:1/&engine=other",
            json={**CHAT, "url": "http://127.0.0.2:1/", "base_url": "http://127.0.0.2:1/"},
            headers=sent_headers,
        )
    assert r.status_code == 200, r.text
    seen = r.json()
    assert seen["path"] == "/v1/chat/completions" and seen["query"] == ""
    assert seen["headers"]["host"] == engine_url.removeprefix("http://")
    leaked = {name.lower() for name in sent_headers} & set(seen["headers"]) - {"host", "x-data-parallel-rank"}
    assert leaked == set(), f"client headers reached the engine: {leaked}"
    assert seen["headers"]["x-data-parallel-rank"] == "0"  # the gateway's choice, not the client's "3"
    assert set(seen["headers"]) <= {
        "host",
        "x-request-id",
        "x-data-parallel-rank",
        "content-type",
        "content-length",
        "accept",
        "accept-encoding",
        "user-agent",
    }, sorted(seen["headers"])
    answered = {name.lower() for name in r.headers}
    assert answered & HOP_BY_HOP_HEADERS - {"connection", "transfer-encoding"} == set(), sorted(answered)
    assert {"set-cookie", "x-engine-internal", "trailer", "proxy-authenticate"} & answered == set(), sorted(answered)
    assert r.headers.get("connection", "keep-alive") == "keep-alive"  # the gateway's own connection, not the engine's
