"""Real servers on loopback for end-to-end tests: simulated engines of both flavours behind a gateway."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from gateway.config import EngineConfig, ScrapeConfig, Settings
from gateway.server.app import create_app
from gateway.serving import serve_in_background
from gateway.sim.mock_engine.app import MockEngineConfig, create_mock_engine_app

MODEL = "deepseek-v3"


@dataclass
class Cluster:
    gateway_url: str
    engine_urls: dict[str, str]
    settings: Settings


@contextlib.asynccontextmanager
async def running_cluster(
    policy: str = "sbs", *, speed: float = 20.0, dp_size: int = 4, **settings: Any
) -> AsyncIterator[Cluster]:
    """An SGLang- and a vLLM-flavoured simulated engine (``dp_size`` ranks each) behind a gateway."""
    async with contextlib.AsyncExitStack() as stack:
        engines = []
        urls = {}
        for name, flavor in (("sg", "sglang"), ("vl", "vllm")):
            app = create_mock_engine_app(MockEngineConfig(flavor=flavor, dp_size=dp_size, model=MODEL, speed=speed))
            urls[name] = await stack.enter_async_context(serve_in_background(app))
            engines.append(EngineConfig(name=name, flavor=flavor, url=urls[name], dp_size=dp_size, models=[MODEL]))
        settings.setdefault("scrape", ScrapeConfig(interval_s=0.1, timeout_s=1.0))
        built = Settings(policy=policy, engines=engines, **settings)
        gateway_url = await stack.enter_async_context(serve_in_background(create_app(built)))
        yield Cluster(gateway_url, urls, built)
