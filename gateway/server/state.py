"""Everything one running gateway owns, built and torn down by the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import aiohttp
from fastapi import Depends, Request

from gateway.config import EngineConfig, Settings
from gateway.dispatch import Dispatcher
from gateway.engines import EngineAdapter
from gateway.load.health import HealthBook, RetryThrottle
from gateway.load.prober import HealthProber
from gateway.load.scraper import MetricsScraper
from gateway.load.view import LoadView
from gateway.scheduling.tokens import Tokenizer
from gateway.telemetry import GatewayMetrics


@dataclass(slots=True)
class GatewayState:
    """The resources of one gateway instance.

    Attributes:
        settings: the settings it was built from.
        metrics: its Prometheus metrics.
        session: the HTTP session towards engines.
        engines: engine name → (configuration, adapter).
        models: models served by at least one engine.
        view: the per-rank load view.
        dispatcher: places requests on ranks.
        scraper: scrapes engine metrics.
        health: circuit breakers of every engine and DP rank.
        prober: probes the engines' health endpoints.
        retry_throttle: stops retries while too many tries fail.
        tokenizer: counts prompt tokens for the allocator.
        draining: set once graceful shutdown began (``/ready`` answers 503 from then on).
    """

    settings: Settings
    metrics: GatewayMetrics
    session: aiohttp.ClientSession
    engines: dict[str, tuple[EngineConfig, EngineAdapter]]
    models: list[str]
    view: LoadView
    dispatcher: Dispatcher
    scraper: MetricsScraper
    health: HealthBook
    prober: HealthProber
    retry_throttle: RetryThrottle
    tokenizer: Tokenizer
    draining: bool = False

    def begin_drain(self) -> None:
        """Graceful shutdown began: report not ready (new traffic goes elsewhere); in-flight work goes on."""
        self.draining = True
        self.metrics.draining.set(1)


def _get_state(request: Request) -> GatewayState:
    state = request.app.state.gateway
    assert isinstance(state, GatewayState)
    return state


State = Annotated[GatewayState, Depends(_get_state)]
"""Route dependency: the running gateway's state."""
