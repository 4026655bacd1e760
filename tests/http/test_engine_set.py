"""The engine set at runtime (:mod:`gateway.engine_set`) on a gateway in front of simulated engines: an engine
added takes requests once probed, a drained one takes no new request while those in flight finish, a removed one
leaves the load view, its tasks and its metrics; removed by force, its requests fail cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from fastapi import FastAPI

from gateway.config import EngineConfig, HealthConfig, ScrapeConfig, Settings
from gateway.server.app import create_app
from gateway.server.state import GatewayState
from gateway.serving import serve_in_background
from gateway.sim.cluster import SimulatedEngine, simulated_engines
from tests.helpers import MODEL, eventually, total


@dataclass
class Running:
    url: str
    app: FastAPI
    engines: dict[str, EngineConfig]

    @property
    def state(self) -> GatewayState:
        state = self.app.state.gateway
        assert isinstance(state, GatewayState)
        return state


@contextlib.asynccontextmanager
async def gateway_with(started: list[str], speed: float = 20.0, policy: str = "round_robin") -> AsyncIterator[Running]:
    """Simulated engines ``a`` (vLLM) and ``b`` (SGLang), 2 DP ranks each; the gateway starts with ``started``."""
    specs = [SimulatedEngine("a", "vllm", 2, MODEL), SimulatedEngine("b", "sglang", 2, MODEL)]
    async with simulated_engines(specs, speed) as configs:
        by_name = {e.name: e for e in configs}
        settings = Settings.model_validate(
            {
                "policy": policy,
                "engines": [by_name[n].model_dump() for n in started],
                "scrape": ScrapeConfig(interval_s=0.1, timeout_s=1.0).model_dump(),
                "health": HealthConfig(probe_interval_s=0.1).model_dump(),
            }
        )
        app = create_app(settings)
        async with serve_in_background(app) as url:
            yield Running(url, app, by_name)


def chat(max_tokens: int = 4, stream: bool = False) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "stream": stream}


async def dispatched(http: httpx.AsyncClient, url: str, engine: str) -> float:
    return total((await http.get(url + "/metrics")).text, "gateway_dispatched_requests_total", engine=engine)


def engine_tasks(name: str) -> list[str]:
    return sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().endswith(f"-{name}") and not t.done())


async def test_added_engine_takes_requests_once_probed_and_leaves_no_trace_when_removed() -> None:
    async with gateway_with(["a"]) as gw, httpx.AsyncClient(timeout=30) as http:
        engines = gw.state.engine_set
        assert engine_tasks("b") == []
        status = await engines.add(gw.engines["b"], "admin")
        assert (status.state, status.dp_size, status.flavor) == ("ready", 2, "sglang")
        assert engine_tasks("b") == ["probe-b", "scrape-b"]
        assert [k.rank for k in gw.state.view.keys if k.engine == "b"] == [0, 1]
        answers = await asyncio.gather(*(http.post(gw.url + "/v1/chat/completions", json=chat()) for _ in range(8)))
        assert [a.status_code for a in answers] == [200] * 8
        assert await dispatched(http, gw.url, "b") == 4  # round robin over the four ranks

        assert await engines.remove("b", "admin") is True
        assert engine_tasks("b") == []
        assert all(k.engine != "b" for k in gw.state.view.keys)
        assert "b" not in gw.state.engines and "b" not in gw.state.health.engines
        text = (await http.get(gw.url + "/metrics")).text
        assert 'engine="b"' not in text
        assert total(text, "gateway_engine_changes_total", change="added", source="admin") == 1
        assert total(text, "gateway_engine_changes_total", change="removed", source="admin") == 1
        answers = await asyncio.gather(*(http.post(gw.url + "/v1/chat/completions", json=chat()) for _ in range(4)))
        assert [a.status_code for a in answers] == [200] * 4
        assert await dispatched(http, gw.url, "a") == 8


async def test_an_engine_added_down_takes_nothing_until_a_probe_answers() -> None:
    async with gateway_with(["a"]) as gw, httpx.AsyncClient(timeout=30) as http:
        dead = gw.engines["b"].model_copy(update={"name": "dead", "url": "http://127.0.0.1:9"})
        status = await gw.state.engine_set.add(dead, "admin")
        assert status.state == "down"
        answers = await asyncio.gather(*(http.post(gw.url + "/v1/chat/completions", json=chat()) for _ in range(4)))
        assert [a.status_code for a in answers] == [200] * 4
        assert await dispatched(http, gw.url, "dead") == 0
        assert await gw.state.engine_set.remove("dead", "admin") is True


async def test_a_drained_engine_finishes_its_requests_and_takes_no_new_one() -> None:
    async with gateway_with(["a", "b"], speed=2.0) as gw, httpx.AsyncClient(timeout=60) as http:
        engines = gw.state.engine_set
        long = [asyncio.create_task(http.post(gw.url + "/v1/chat/completions", json=chat(60))) for _ in range(4)]

        async def both_busy() -> bool:
            return gw.state.view.engine_inflight("a") == 2 and gw.state.view.engine_inflight("b") == 2

        await eventually(both_busy)
        status = engines.drain("b", "admin")
        assert (status.state, status.inflight) == ("draining", 2)
        assert gw.state.health.held("b")
        before = await dispatched(http, gw.url, "b")
        short = await asyncio.gather(*(http.post(gw.url + "/v1/chat/completions", json=chat()) for _ in range(6)))
        assert [a.status_code for a in short] == [200] * 6
        assert await dispatched(http, gw.url, "b") == before
        assert [(await t).status_code for t in long] == [200] * 4  # the drained engine's requests finished
        text = (await http.get(gw.url + "/metrics")).text
        assert total(text, "gateway_engine_draining", engine="b") == 1
        assert (await http.get(gw.url + "/ready")).status_code == 200

        assert engines.undrain("b", "admin").state == "ready"
        more = await asyncio.gather(*(http.post(gw.url + "/v1/chat/completions", json=chat()) for _ in range(4)))
        assert [a.status_code for a in more] == [200] * 4
        assert await dispatched(http, gw.url, "b") > before


async def test_removal_waits_for_the_requests_in_flight() -> None:
    async with gateway_with(["a", "b"], speed=2.0) as gw, httpx.AsyncClient(timeout=60) as http:
        engines = gw.state.engine_set
        long = [asyncio.create_task(http.post(gw.url + "/v1/chat/completions", json=chat(40))) for _ in range(4)]

        async def b_busy() -> bool:
            return gw.state.view.engine_inflight("b") == 2

        await eventually(b_busy)
        assert await engines.remove("b", "admin") is False  # still in flight there: removed in the background
        status = engines.status("b")
        assert (status.state, status.removing) == ("draining", True)
        assert [(await t).status_code for t in long] == [200] * 4

        async def gone() -> bool:
            return "b" not in gw.state.engines

        await eventually(gone)
        assert engine_tasks("b") == []


async def test_forced_removal_retries_unstarted_answers_and_ends_started_streams_cleanly() -> None:
    async with gateway_with(["a", "b"], speed=1.0) as gw, httpx.AsyncClient(timeout=60) as http:
        engines = gw.state.engine_set
        engines.drain("a", "admin")  # everything new goes to b
        whole = [asyncio.create_task(http.post(gw.url + "/v1/chat/completions", json=chat(30))) for _ in range(2)]
        events: list[str] = []
        first = asyncio.Event()

        async def stream() -> None:
            async with http.stream("POST", gw.url + "/v1/chat/completions", json=chat(400, stream=True)) as answer:
                assert answer.status_code == 200
                async for line in answer.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line.removeprefix("data: "))
                        first.set()

        streaming = asyncio.create_task(stream())
        await first.wait()

        async def three_on_b() -> bool:
            return gw.state.view.engine_inflight("b") == 3

        await eventually(three_on_b)
        engines.undrain("a", "admin")
        assert await engines.remove("b", "admin", force=True) is True
        assert "b" not in gw.state.engines
        await streaming
        assert events[-1] == "[DONE]"
        assert "error" in json.loads(events[-2])  # an OpenAI-style error event, then [DONE]
        answers = [await t for t in whole]
        assert [a.status_code for a in answers] == [200] * 2  # tried again on a
        assert gw.state.view.engine_inflight("a") == 0
        assert await dispatched(http, gw.url, "a") == 2
