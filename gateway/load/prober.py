"""Active health checks: ``GET /health`` of every engine on an interval, feeding the circuit breakers
(:class:`~gateway.load.health.HealthBook`).

Each engine is probed on its own task with a total timeout, so a hung engine delays nobody else and is marked
down after ``failure_threshold`` probes (about ``failure_threshold * probe_interval_s`` seconds).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from gateway.config import HealthConfig
from gateway.engines import Engine
from gateway.engines.client import EngineClient
from gateway.errors import UpstreamError
from gateway.load.engine_loop import PerEngineLoop
from gateway.load.health import BreakerState, HealthBook
from gateway.telemetry import GatewayMetrics

log = logging.getLogger(__name__)

HEALTH_MAX_BYTES = 64 * 1024
"""Largest ``/health`` body read (vLLM and SGLang answer an empty body)."""


class HealthProber(PerEngineLoop):
    """Probes every engine's health endpoint and keeps ``gateway_engine_up`` current.

    Args:
        client: HTTP client for the probes.
        engines: the engines to probe.
        health: the breakers to feed.
        metrics: the gateway's metrics.
        config: probe interval and timeout.
        on_change: called when an engine's breaker changes state (the dispatcher re-checks its window).
        clock: monotonic clock in seconds.
    """

    def __init__(
        self,
        client: EngineClient,
        engines: Sequence[Engine],
        health: HealthBook,
        metrics: GatewayMetrics,
        config: HealthConfig,
        *,
        on_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(client, engines, config.probe_interval_s, "probe", clock)
        self._health = health
        self._metrics = metrics
        self._config = config
        self._on_change = on_change
        self._last_state: dict[str, BreakerState] = {}
        self.publish()

    def publish(self) -> None:
        """Set ``gateway_engine_up`` from the breakers, log state changes and call ``on_change`` on any."""
        now = self._clock()
        changed = False
        for name in self._health.engines:
            state = self._health.engine(name).state(now)
            self._metrics.engine_up.labels(name).set(0 if state is BreakerState.OPEN else 1)
            previous = self._last_state.get(name)
            if previous is not None and previous is not state:
                changed = True
                log.warning("engine %s: circuit %s -> %s", name, previous.value, state.value)
            self._last_state[name] = state
        if changed and self._on_change is not None:
            self._on_change()

    async def once(self, engine: Engine) -> bool:
        """Probe one engine now, record the result and return it. Never raises."""
        try:
            url = engine.url(engine.adapter.health_path)
            await self._client.get_text(url, self._config.probe_timeout_s, HEALTH_MAX_BYTES)
            ok = True
        except UpstreamError as exc:
            log.debug("health probe of %s failed: %s", engine.name, exc)
            ok = False
        self._health.record_probe(engine.name, ok, self._clock())
        self._metrics.health_checks.labels(engine.name, "ok" if ok else "error").inc()
        self.publish()
        return ok
