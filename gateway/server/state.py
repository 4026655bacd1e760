"""Everything one running gateway owns, built and torn down by the app's lifespan."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from gateway.config import Settings
from gateway.discovery.kubernetes import KubernetesDiscovery
from gateway.dispatch import Dispatcher
from gateway.engine_set import EngineSet
from gateway.engines import Engine
from gateway.engines.client import EngineClient
from gateway.load.health import HealthBook, RetryThrottle
from gateway.load.prober import HealthProber
from gateway.load.scraper import MetricsScraper
from gateway.load.view import LoadView
from gateway.server.responses_store import ResponseHomes
from gateway.telemetry import GatewayMetrics
from gateway.tokens import PromptCounter


@dataclass(slots=True)
class GatewayState:
    """The resources of one gateway instance.

    Attributes:
        settings: the settings it was built from.
        metrics: its Prometheus metrics.
        client: the HTTP client towards engines.
        engines: engine name → engine.
        models: models served by at least one engine.
        view: the per-rank load view.
        dispatcher: places requests on ranks.
        scraper: scrapes engine metrics.
        health: circuit breakers of every engine and DP rank.
        prober: probes the engines' health endpoints.
        retry_throttle: stops retries while too many tries fail.
        prompt_counter: counts prompt tokens for the allocator, per model, and learns from the engines' counts.
        clock: the monotonic clock (seconds) of the dispatcher, the scraper, the prober and the front door.
        response_homes: the engine rank of each stored Response (:mod:`gateway.server.responses`).
        retry_rng: draws the jitter of retry backoffs.
        pd_rng: draws the bootstrap rooms of SGLang P/D attempts.
        mooncake_engine_ids: per vLLM Mooncake prefill engine, its ``{dp_rank: engine_id}`` as its bootstrap server
            lists them (:mod:`gateway.server.pd_relay`).
        draining: set once graceful shutdown began (``/ready`` answers 503 from then on).
        engine_set: adds, drains and removes engines at runtime (it changes ``engines`` and ``models`` in place).
        discovery: finds engine pods in Kubernetes (``discovery`` section), ``None`` when off.
    """

    settings: Settings
    metrics: GatewayMetrics
    client: EngineClient
    engines: dict[str, Engine]
    models: list[str]
    view: LoadView
    dispatcher: Dispatcher
    scraper: MetricsScraper
    health: HealthBook
    prober: HealthProber
    retry_throttle: RetryThrottle
    prompt_counter: PromptCounter
    clock: Callable[[], float]
    response_homes: ResponseHomes
    engine_set: EngineSet
    retry_rng: random.Random = field(default_factory=random.Random)
    pd_rng: random.Random = field(default_factory=random.Random)
    mooncake_engine_ids: dict[str, dict[int, str]] = field(default_factory=dict)
    draining: bool = False
    discovery: KubernetesDiscovery | None = None

    def prompt_tokens_reported(self, model: str, estimated: int, reported: int) -> None:
        """An engine reported ``reported`` prompt tokens (its ``usage.prompt_tokens``) for a request of ``model``
        whose prompt the scheduler counted as ``estimated`` tokens (the corrected estimate): observed in
        ``gateway_prompt_tokens_estimate_ratio`` as ``reported / estimated`` (an estimate below 1 counts as 1), and
        fed to the model's online correction."""
        self.metrics.prompt_tokens_ratio.labels(model).observe(reported / max(1, estimated))
        self.prompt_counter.observe(model, estimated, reported)

    def begin_drain(self) -> None:
        """Graceful shutdown began: report not ready (new traffic goes elsewhere); in-flight work goes on."""
        self.draining = True
        self.metrics.draining.set(1)


async def _get_state(request: Request) -> GatewayState:  # async: FastAPI runs a plain def in a thread
    state = request.app.state.gateway
    assert isinstance(state, GatewayState)
    return state


State = Annotated[GatewayState, Depends(_get_state)]
"""Route dependency: the running gateway's state."""
