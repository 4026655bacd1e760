"""With ``scrape.engine_queued_tokens`` on, the scraper reads SGLang's per-rank queued prefill tokens (``GET
/v1/loads``) next to ``/metrics``, and the load view takes them as the truth; vLLM is never asked, and an engine
without the endpoint stops being asked."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response

from gateway.config import EngineConfig, ScrapeConfig, UpstreamConfig
from gateway.engines import Engine
from gateway.engines.client import EngineClient
from gateway.load.scraper import LOADS_MAX_FAILURES, MetricsScraper
from gateway.serving import serve_in_background
from gateway.sim.mock_engine.app import MockEngineConfig, create_mock_engine_app
from gateway.telemetry import GatewayMetrics
from gateway.tokens import count_prompt_tokens
from tests.helpers import make_view

MODEL = "deepseek-v3"
SCRAPE = ScrapeConfig(interval_s=60, timeout_s=2.0, engine_queued_tokens=True)
CHINESE = "人人生而自由，在尊严和权利上一律平等。他们赋有理性和良心，并应以兄弟关系的精神相对待。" * 40


def scraper(url: str, client: EngineClient, flavor: str = "sglang", config: ScrapeConfig = SCRAPE):
    engine = EngineConfig(name="e", flavor=flavor, url=url, dp_size=2, models=[MODEL])
    view = make_view("e", dp_size=2, model=MODEL, stale_after_s=30)
    return MetricsScraper(client, [Engine.from_config(engine)], view, GatewayMetrics(), config), view


async def wait_for(engine: httpx.AsyncClient, rank: int, running: int, waiting: int) -> dict:
    for _ in range(200):
        loads = (await engine.get("/v1/loads", params={"include": "core"})).json()["loads"]
        if (loads[rank]["num_running_reqs"], loads[rank]["num_waiting_reqs"]) == (running, waiting):
            return loads[rank]
        await asyncio.sleep(0.02)
    raise AssertionError(f"rank {rank} never had {running} running and {waiting} waiting: {loads}")


async def test_the_load_view_takes_sglangs_count_of_queued_tokens() -> None:
    # the engine counts with DeepSeek-V3's tokenizer and a step lasts for ever: a first request runs its prefill
    # step, a second one stays queued behind it
    app = create_mock_engine_app(MockEngineConfig("sglang", 2, MODEL, speed=1e-6, tokenizer="deepseek"))
    async with (
        serve_in_background(app) as url,
        EngineClient(UpstreamConfig()) as client,
        httpx.AsyncClient(base_url=url, timeout=10) as engine,
    ):
        body = {"model": MODEL, "prompt": CHINESE, "max_tokens": 4, "routed_dp_rank": 1}
        tasks = [asyncio.create_task(engine.post("/v1/completions", json=body))]
        await wait_for(engine, 1, running=1, waiting=0)
        tasks.append(asyncio.create_task(engine.post("/v1/completions", json=body)))
        reported = await wait_for(engine, 1, running=1, waiting=1)
        scrape, view = scraper(url, client)
        assert await scrape.once(scrape._engines[0]) is True
        for task in tasks:
            task.cancel()
        seen = (await engine.get("/_sim/requests")).json()
    queued = {load.key.rank: load.queued_prefill_tokens for load in view.snapshot(0.0)}
    assert queued == {0: 0.0, 1: float(reported["num_waiting_uncached_tokens"])}
    # Chinese runs about 1.4 characters a token: far above the four-characters estimate
    assert queued[1] > 1.5 * count_prompt_tokens({"prompt": CHINESE})
    assert seen["polls"]["/v1/loads"] >= 1


async def test_vllm_is_not_asked_and_sglang_only_when_switched_on() -> None:
    for flavor, config in (("vllm", SCRAPE), ("sglang", ScrapeConfig(interval_s=60, timeout_s=2.0))):
        app = create_mock_engine_app(MockEngineConfig(flavor, 2, MODEL))
        async with (
            serve_in_background(app) as url,
            EngineClient(UpstreamConfig()) as client,
            httpx.AsyncClient(base_url=url) as engine,
        ):
            scrape, _ = scraper(url, client, flavor, config)
            assert scrape.reads_loads(scrape._engines[0]) is False
            assert await scrape.once(scrape._engines[0]) is True
            polls = (await engine.get("/_sim/requests")).json()["polls"]
        assert polls["/v1/loads"] == 0 and polls["/metrics"] == 1


def sglang_without_loads(hits: Counter[str]) -> FastAPI:
    """An SGLang older than ``/v1/loads``: ``/metrics`` answers, ``/v1/loads`` is 404."""
    app = FastAPI()

    async def metrics() -> Response:
        hits["/metrics"] += 1
        return PlainTextResponse('sglang:num_running_reqs{dp_rank="0"} 1\n')

    async def loads() -> Response:
        hits["/v1/loads"] += 1
        return PlainTextResponse("Not Found", 404)

    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/v1/loads", loads, methods=["GET"])
    return app


async def test_an_engine_without_the_endpoint_stops_being_asked() -> None:
    hits: Counter[str] = Counter()
    async with serve_in_background(sglang_without_loads(hits)) as url, EngineClient(UpstreamConfig()) as client:
        scrape, view = scraper(url, client)
        engine = scrape._engines[0]
        for _ in range(LOADS_MAX_FAILURES + 2):
            assert await scrape.once(engine) is True  # the scrape itself succeeds every time
    assert hits == {"/metrics": LOADS_MAX_FAILURES + 2, "/v1/loads": LOADS_MAX_FAILURES}
    assert scrape.reads_loads(engine) is False
    assert [load.running for load in view.snapshot(0.0)] == [1.0, 0.0]
