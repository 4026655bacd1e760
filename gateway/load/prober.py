"""Active health checks: ``GET /health`` of every engine on an interval, feeding the circuit breakers
(:class:`~gateway.load.health.HealthBook`).

Each engine is probed on its own task with a total timeout, so a hung engine delays nobody else and is marked
down after ``failure_threshold`` probes (about ``failure_threshold * probe_interval_s`` seconds).

An engine with ``prefill_alignment: auto`` whose flavour reports its settings (SGLang's ``/get_server_info``) has
them read after its first successful probe, and again after each failed one (it may have been restarted with other
flags); what it says reaches ``on_alignment``.
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
SERVER_INFO_MAX_BYTES = 4 * 1024 * 1024
"""Largest ``/get_server_info`` body read (SGLang's is tens of kilobytes: every server argument plus internal
state per DP rank)."""


class HealthProber(PerEngineLoop):
    """Probes every engine's health endpoint and keeps ``gateway_engine_up`` current.

    Args:
        client: HTTP client for the probes.
        engines: the engines to probe.
        health: the breakers to feed.
        metrics: the gateway's metrics.
        config: probe interval and timeout.
        on_change: called when an engine's breaker changes state (the dispatcher re-checks its window).
        on_alignment: called with an engine's name and whether it aligns its own prefill, when read from an
            engine with ``prefill_alignment: auto``.
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
        on_alignment: Callable[[str, bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(client, engines, config.probe_interval_s, "probe", clock)
        self._health = health
        self._metrics = metrics
        self._config = config
        self._on_change = on_change
        self._on_alignment = on_alignment
        self._alignment_unread = {
            e.name for e in engines if e.config.prefill_alignment == "auto" and e.adapter.server_info_path is not None
        }
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

    async def add(self, engine: Engine) -> bool:
        """Probe ``engine``, added at runtime, now and then on the interval; return whether the probe succeeded
        (:meth:`PerEngineLoop.add`)."""
        if engine.config.prefill_alignment == "auto" and engine.adapter.server_info_path is not None:
            self._alignment_unread.add(engine.name)
        return await super().add(engine)

    async def remove(self, name: str) -> None:
        """Stop probing engine ``name``."""
        await super().remove(name)
        self._alignment_unread.discard(name)
        self._last_state.pop(name, None)

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
        if ok and engine.name in self._alignment_unread:
            await self._read_alignment(engine)
        elif not ok and engine.config.prefill_alignment == "auto" and engine.adapter.server_info_path is not None:
            self._alignment_unread.add(engine.name)
        return ok

    async def _read_alignment(self, engine: Engine) -> None:
        """Read whether ``engine`` aligns its own prefill from its server info and report it. Never raises; a
        failed read is tried again after the next probe."""
        path = engine.adapter.server_info_path
        assert path is not None
        try:
            text = await self._client.get_text(engine.url(path), self._config.probe_timeout_s, SERVER_INFO_MAX_BYTES)
        except UpstreamError as exc:
            log.debug("server info of %s could not be read: %s", engine.name, exc)
            return
        self._alignment_unread.discard(engine.name)
        aligned = engine.adapter.prefill_alignment_from_server_info(text)
        log.info("engine %s: own prefill alignment %s", engine.name, "on" if aligned else "off")
        if self._on_alignment is not None:
            self._on_alignment(engine.name, bool(aligned))
