"""The scraper reads a P/D SGLang engine's ``GET /v1/loads`` at every scrape whatever ``scrape.engine_queued_tokens``
says, and its figures of a P/D rank replace the ``/metrics`` gauges, which move only at the engine's logging
interval; a mixed engine is asked only with the setting on, as before."""

from __future__ import annotations

import json
from collections import Counter

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response

from gateway.config import EngineConfig, ScrapeConfig, UpstreamConfig
from gateway.engines import Engine
from gateway.engines.client import EngineClient
from gateway.load.scraper import MetricsScraper
from gateway.load.view import EngineSpec, LoadView
from gateway.serving import serve_in_background
from gateway.telemetry import GatewayMetrics
from gateway.types import RankKey

MODEL = "deepseek-v3"
SCRAPE = ScrapeConfig(interval_s=60, timeout_s=2.0)
STALE_METRICS = (
    '# TYPE sglang:num_running_reqs gauge\nsglang:num_running_reqs{dp_rank="0",engine_type="decode"} 1.0\n'
    '# TYPE sglang:num_decode_prealloc_queue_reqs gauge\nsglang:num_decode_prealloc_queue_reqs{dp_rank="0"} 0.0\n'
)
"""The decode rank as the ``/metrics`` gauges last logged it: one request running."""
FRESH_LOAD = {
    "dp_rank": 0,
    "num_running_reqs": 2,
    "num_waiting_reqs": 5,  # the 3 pre-allocating and 2 in transfer
    "num_waiting_uncached_tokens": 0,
    "num_used_tokens": 6000,
    "num_total_tokens": 9000,
    "disaggregation": {
        "mode": "decode",
        "prefill_bootstrap_queue_reqs": 0,
        "prefill_inflight_queue_reqs": 0,
        "decode_prealloc_queue_reqs": 3,
        "decode_transfer_queue_reqs": 2,
        "decode_retracted_queue_reqs": 0,
    },
}
"""The same rank in the scheduler's latest snapshot (the ``/v1/loads`` entry, SGLang 0.5.23)."""


def sglang_decode(hits: Counter[str]) -> FastAPI:
    app = FastAPI()

    async def metrics() -> Response:
        hits["/metrics"] += 1
        return PlainTextResponse(STALE_METRICS)

    async def loads(include: str = "all") -> Response:
        hits[f"/v1/loads?include={include}"] += 1
        return PlainTextResponse(json.dumps({"version": "0.5.23", "loads": [FRESH_LOAD]}))

    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/v1/loads", loads, methods=["GET"])
    return app


async def scrape_once(role: str, config: ScrapeConfig = SCRAPE) -> tuple[Counter[str], LoadView]:
    hits: Counter[str] = Counter()
    async with serve_in_background(sglang_decode(hits)) as url, EngineClient(UpstreamConfig()) as client:
        engine = EngineConfig(name="d", flavor="sglang", url=url, dp_size=1, models=[MODEL], role=role)  # type: ignore[arg-type]
        view = LoadView([EngineSpec("d", 1, frozenset({MODEL}), 8192, role)], stale_after_s=30)
        scraper = MetricsScraper(client, [Engine.from_config(engine)], view, GatewayMetrics(), config)
        assert await scraper.once(scraper._engines[0]) is True
    return hits, view


async def test_a_decode_engines_loads_are_read_and_replace_its_gauges() -> None:
    hits, view = await scrape_once("decode")
    assert hits == {"/metrics": 1, "/v1/loads?include=core,disagg": 1}
    [load] = view.snapshot(0.0)
    assert load.key == RankKey("d", 0)
    assert (load.running, load.waiting, load.decode_prealloc, load.decode_transfer) == (7, 0, 3, 2)
    assert load.kv_tokens == 9000


async def test_a_mixed_engine_is_asked_only_with_the_setting_on() -> None:
    hits, _ = await scrape_once("mixed")
    assert hits == {"/metrics": 1}
    hits, _ = await scrape_once("mixed", ScrapeConfig(interval_s=60, timeout_s=2.0, engine_queued_tokens=True))
    assert hits == {"/metrics": 1, "/v1/loads?include=core,disagg": 1}
