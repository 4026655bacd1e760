"""Engines changed through the admin API while a trace replays through the gateway: nothing fails, a drained engine
takes no new request (by the gateway's count and by the engine's own), an engine added takes its share, an engine
removed leaves once its requests have ended."""

from __future__ import annotations

import asyncio
import random

import httpx

from gateway.config import EngineConfig, Settings
from gateway.replay.client import replay
from gateway.sim.cluster import SimulatedEngine, running_gateway, simulated_engines
from gateway.workload.traces import TraceRequest
from tests.helpers import eventually, total

MODEL = "m"
ADMIN = {"Authorization": "Bearer admin"}
SPECS = [SimulatedEngine("a", "vllm", 4, MODEL), SimulatedEngine("b", "sglang", 4, MODEL)]


def trace(seed: int, n: int, rate: float) -> list[TraceRequest]:
    """``n`` Poisson arrivals at ``rate`` a second, short prompts and answers (seeded)."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(TraceRequest(t, rng.randint(50, 800), rng.randint(4, 40)))
    return out


def settings_for(engines: list[EngineConfig]) -> Settings:
    return Settings.model_validate(
        {
            "policy": "sbs",
            "engines": [e.model_dump() for e in engines],
            "health": {"probe_interval_s": 0.2},
            "scrape": {"interval_s": 0.1, "timeout_s": 1.0},
            "security": {"admin_keys": ["admin"], "metrics_auth": "open"},
        }
    )


async def gateway_count(http: httpx.AsyncClient, url: str, engine: str) -> float:
    return total((await http.get(url + "/metrics")).text, "gateway_dispatched_requests_total", engine=engine)


async def test_draining_an_engine_mid_replay_fails_nothing_and_sends_it_nothing_new() -> None:
    async with simulated_engines(SPECS, 10.0) as engines, running_gateway(settings_for(engines)) as url:
        b_url = engines[1].url
        async with httpx.AsyncClient(timeout=30) as http:
            drained_at: dict[str, float] = {}

            async def drain_b() -> None:
                await asyncio.sleep(1.0)  # a quarter of the way through the 4-second trace
                assert await gateway_count(http, url, "b") > 0
                answer = await http.post(url + "/admin/engines/b/drain", headers=ADMIN)
                assert answer.json()["state"] == "draining"
                drained_at["b"] = await gateway_count(http, url, "b")

            result, _ = await asyncio.gather(
                replay(url, trace(seed=11, n=160, rate=40.0), model=MODEL, progress=False, api_key="admin"),
                drain_b(),
            )
            assert len(result.records) == 160
            assert [r.error_detail for r in result.records if not r.ok] == []
            sent_b = await gateway_count(http, url, "b")
            assert sent_b == drained_at["b"]  # nothing placed on b after the drain
            assert await gateway_count(http, url, "a") == 160 - sent_b

            async def b_finished_all() -> bool:  # the engine's own count: it served exactly what it got, to the end
                text = (await http.get(b_url + "/metrics")).text
                return total(text, "sglang:num_requests_total") == sent_b

            await eventually(b_finished_all)
            assert total((await http.get(b_url + "/metrics")).text, "sglang:num_aborted_requests_total") == 0
            listed = (await http.get(url + "/admin/engines", headers=ADMIN)).json()["data"]
            assert [(e["name"], e["state"], e["inflight"]) for e in listed] == [
                ("a", "ready", 0),
                ("b", "draining", 0),
            ]


async def test_adding_and_removing_engines_mid_replay_fails_nothing() -> None:
    specs = [*SPECS, SimulatedEngine("c", "vllm", 4, MODEL)]
    # real time: an engine added starts with the step-time prior (window.initial_step_s), which fits engines at
    # speed 1; against engines ten times faster, whose steps the gateway has timed, it would take little at first
    async with simulated_engines(specs, 1.0) as engines, running_gateway(settings_for(engines[:2])) as url:
        c = engines[2].model_dump(mode="json")
        async with httpx.AsyncClient(timeout=30) as http:

            async def change() -> None:
                await asyncio.sleep(1.0)
                added = await http.post(url + "/admin/engines", json=c, headers=ADMIN)
                assert (added.status_code, added.json()["state"]) == (201, "ready")
                await asyncio.sleep(1.0)
                removed = await http.delete(url + "/admin/engines/a", headers=ADMIN)
                assert removed.status_code in (200, 202)

                async def a_gone() -> bool:
                    listed = (await http.get(url + "/admin/engines", headers=ADMIN)).json()["data"]
                    return [e["name"] for e in listed] == ["b", "c"]

                await eventually(a_gone)

            result, _ = await asyncio.gather(
                replay(url, trace(seed=12, n=200, rate=40.0), model=MODEL, progress=False, api_key="admin"),
                change(),
            )
            assert len(result.records) == 200
            assert [r.error_detail for r in result.records if not r.ok] == []
            text = (await http.get(url + "/metrics")).text
            assert 'engine="a"' not in text  # removed: its series are no longer exported
            assert total(text, "gateway_dispatched_requests_total", engine="c") > 0

            async def served() -> dict[str, float]:  # by each engine's own count of the requests it finished
                series = {"a": "vllm:request_success_total", "b": "sglang:num_requests_total"}
                series["c"] = series["a"]
                out = {}
                for engine, config in zip("abc", engines, strict=True):
                    out[engine] = total((await http.get(config.url + "/metrics")).text, series[engine])
                return out

            async def all_served() -> bool:
                return sum((await served()).values()) == 200

            await eventually(all_served)
            assert (await served())["c"] > 0
            assert total(text, "gateway_engine_changes_total", change="added", source="admin") == 1
            assert total(text, "gateway_engine_changes_total", change="removed", source="admin") == 1
            assert total(text, "gateway_inflight_requests") == 0


async def test_draining_a_prefill_engine_of_a_pd_model_mid_replay_fails_nothing() -> None:
    specs = [
        SimulatedEngine("p1", "sglang", 2, MODEL, role="prefill"),
        SimulatedEngine("p2", "sglang", 2, MODEL, role="prefill"),
        SimulatedEngine("d1", "sglang", 4, MODEL, role="decode"),
    ]
    async with (
        simulated_engines(specs, 10.0) as engines,
        running_gateway(settings_for(engines)) as url,
        httpx.AsyncClient(timeout=30) as http,
    ):
        drained_at: dict[str, float] = {}

        async def drain_p1() -> None:
            await asyncio.sleep(1.0)
            assert await gateway_count(http, url, "p1") > 0
            answer = await http.post(url + "/admin/engines/p1/drain", headers=ADMIN)
            assert answer.json()["state"] == "draining"
            drained_at["p1"] = await gateway_count(http, url, "p1")

        result, _ = await asyncio.gather(
            replay(url, trace(seed=13, n=120, rate=30.0), model=MODEL, progress=False, api_key="admin"),
            drain_p1(),
        )
        assert [r.error_detail for r in result.records if not r.ok] == []
        assert len(result.records) == 120
        assert await gateway_count(http, url, "p1") == drained_at["p1"]  # no prefill leg placed there after
        assert await gateway_count(http, url, "p2") == 120 - drained_at["p1"]
        assert await gateway_count(http, url, "d1") == 120
        listed = (await http.get(url + "/admin/engines", headers=ADMIN)).json()["data"]
        assert {e["name"]: (e["state"], e["inflight"]) for e in listed} == {
            "p1": ("draining", 0),
            "p2": ("ready", 0),
            "d1": ("ready", 0),
        }
