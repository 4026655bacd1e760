"""The admin API of the engine set (``/admin/engines``, :mod:`gateway.server.admin`) over HTTP: admin key, listing,
adding with the configuration file's validation, drain, undrain and removal, OpenAI-style errors."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx

from gateway.config import EngineConfig, Settings
from gateway.server.app import create_app
from gateway.serving import serve_in_background
from gateway.sim.cluster import SimulatedEngine, simulated_engines
from tests.helpers import MODEL, total

ADMIN = {"Authorization": "Bearer admin-key"}


@contextlib.asynccontextmanager
async def admin_gateway() -> AsyncIterator[tuple[str, dict[str, EngineConfig]]]:
    """Engines ``a`` (vLLM) and ``b`` (SGLang), 2 DP ranks each; the gateway starts with ``a`` and an admin key."""
    specs = [SimulatedEngine("a", "vllm", 2, MODEL), SimulatedEngine("b", "sglang", 2, MODEL)]
    async with simulated_engines(specs, 20.0) as configs:
        settings = Settings.model_validate(
            {
                "policy": "round_robin",
                "engines": [configs[0].model_dump()],
                "health": {"probe_interval_s": 0.1},
                "security": {"admin_keys": ["admin-key"]},
            }
        )
        async with serve_in_background(create_app(settings)) as url:
            yield url, {e.name: e for e in configs}


def error_of(answer: httpx.Response) -> dict[str, object]:
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error, dict)
    return error


async def test_the_admin_api_adds_drains_undrains_and_removes_an_engine() -> None:
    async with admin_gateway() as (url, engines), httpx.AsyncClient(base_url=url, timeout=30) as http:
        assert (await http.get("/admin/engines")).status_code == 401
        listed = (await http.get("/admin/engines", headers=ADMIN)).json()
        assert [(e["name"], e["state"], e["dp_size"], e["flavor"], e["role"]) for e in listed["data"]] == [
            ("a", "ready", 2, "vllm", "mixed")
        ]

        b = engines["b"].model_dump(mode="json")
        added = await http.post("/admin/engines", json=b, headers=ADMIN)
        assert added.status_code == 201, added.text
        assert added.json() | {"url": None} == {
            "name": "b",
            "url": None,
            "flavor": "sglang",
            "role": "mixed",
            "dp_size": 2,
            "models": [MODEL],
            "state": "ready",
            "removing": False,
            "inflight": 0,
        }
        again = await http.post("/admin/engines", json=b, headers=ADMIN)
        assert again.status_code == 409 and error_of(again)["param"] == "name"

        drained = await http.post("/admin/engines/b/drain", headers=ADMIN)
        assert drained.json()["state"] == "draining"
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        answers = await asyncio.gather(*(http.post("/v1/chat/completions", json=chat, headers=ADMIN) for _ in range(4)))
        assert [a.status_code for a in answers] == [200] * 4
        metrics = (await http.get("/metrics", headers=ADMIN)).text
        assert total(metrics, "gateway_dispatched_requests_total", engine="b") == 0
        assert total(metrics, "gateway_engine_draining", engine="b") == 1
        assert (await http.post("/admin/engines/b/undrain", headers=ADMIN)).json()["state"] == "ready"

        removed = await http.delete("/admin/engines/b", headers=ADMIN)
        assert (removed.status_code, removed.json()) == (200, {"name": "b", "removed": True})
        assert [e["name"] for e in (await http.get("/admin/engines", headers=ADMIN)).json()["data"]] == ["a"]
        metrics = (await http.get("/metrics", headers=ADMIN)).text
        for change in ("added", "drained", "undrained", "removed"):
            assert total(metrics, "gateway_engine_changes_total", change=change, source="admin") >= 1, change
        missing = await http.delete("/admin/engines/b", headers=ADMIN)
        assert missing.status_code == 404 and error_of(missing)["type"] == "not_found_error"


async def test_an_engine_is_validated_as_the_configuration_file_would_be() -> None:
    async with admin_gateway() as (url, engines), httpx.AsyncClient(base_url=url, timeout=30) as http:
        b = engines["b"].model_dump(mode="json")
        cases = [
            ({**b, "url": "ftp://x"}, "url"),
            ({**b, "dp_size": 0}, "dp_size"),
            ({**b, "colour": "red"}, "colour"),
            ({k: v for k, v in b.items() if k != "models"}, "models"),
            ({**b, "role": "prefill"}, "engines"),  # the model is served mixed by a: one way only
        ]
        for body, param in cases:
            answer = await http.post("/admin/engines", json=body, headers=ADMIN)
            assert answer.status_code == 400, (body, answer.text)
            error = error_of(answer)
            assert (error["type"], error["param"]) == ("invalid_request_error", param), error
        not_json = await http.post("/admin/engines", content=b"{", headers=ADMIN)
        assert not_json.status_code == 400
        assert [e["name"] for e in (await http.get("/admin/engines", headers=ADMIN)).json()["data"]] == ["a"]
        assert (await http.post("/admin/engines/nope/drain", headers=ADMIN)).status_code == 404


async def test_the_admin_routes_are_in_the_openapi_document() -> None:
    engine = EngineConfig(name="e", flavor="vllm", url="http://127.0.0.1:9", models=[MODEL])
    paths = create_app(Settings(engines=[engine])).openapi()["paths"]
    assert set(paths["/admin/engines"]) == {"get", "post"}
    assert set(paths["/admin/engines/{name}"]) == {"delete"}
    assert "post" in paths["/admin/engines/{name}/drain"] and "post" in paths["/admin/engines/{name}/undrain"]
    schema = paths["/admin/engines"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"name", "flavor", "url", "dp_size", "role", "models"} <= set(schema["properties"])
