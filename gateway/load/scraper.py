"""Async scraper of the engines' ``/metrics``, feeding each outcome to a :class:`ScrapeSink` (the dispatcher, which
hands it to the scheduler's progress protocol).

Each engine is scraped on its own schedule (``scrape.interval_s``) with a total timeout (``scrape.timeout_s``)
and a size bound (``scrape.max_response_bytes``), so a slow, hung or flooding engine delays nobody else. The
text is parsed in a worker thread: a large body (a vLLM server with many DP ranks exports hundreds of KB,
several milliseconds of parsing per 50 KB) does not stall the event loop that closes windows and relays streams.
A failed or unparsable scrape is counted and leaves the load view on local accounting for that engine; so
does an unexpected error (logged with its traceback): nothing an engine sends can end its scraping loop.

Where the engine's adapter reads a per-rank load endpoint of its own (:class:`LoadsSource`: SGLang's ``GET
/v1/loads``), that endpoint is read alongside ``/metrics`` at each scrape, concurrently, when
``scrape.engine_queued_tokens`` is on (its queued prefill tokens join each rank's :class:`RankMetrics` as
``queued_prefill_tokens``) and, whatever that setting, for a P/D engine (``engines[].role`` ``prefill`` or
``decode``): its figures of a P/D rank (requests, the P/D queues, the decode rank's KV tokens) are newer than the
``/metrics`` gauges and replace them. Its failure costs only those figures: the rank keeps ``/metrics`` and local
accounting until the next success. An engine whose ``/metrics`` answers while this endpoint fails
:data:`LOADS_MAX_FAILURES` times in a row (an SGLang older than the endpoint) is not asked again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from gateway.config import ScrapeConfig
from gateway.engines import Engine, MetricsParseError
from gateway.engines.client import EngineClient
from gateway.errors import UpstreamError
from gateway.load.engine_loop import PerEngineLoop
from gateway.telemetry import GatewayMetrics
from gateway.types import RankMetrics

log = logging.getLogger(__name__)


class ScrapeSink(Protocol):
    """Takes each scrape's outcome: :class:`~gateway.dispatch.Dispatcher` in the gateway (it passes it to
    ``Scheduler.on_scrape`` and wakes the window loop); a bare :class:`~gateway.load.view.LoadView` fits too."""

    def on_scrape(self, engine: str, ranks: dict[int, RankMetrics], now: float) -> None:
        """A scrape of ``engine`` succeeded with per-DP-rank figures, at ``now`` (seconds)."""

    def on_scrape_failure(self, engine: str, now: float) -> None:
        """A scrape of ``engine`` failed (unreachable, timeout, too large, unparsable), at ``now`` (seconds)."""


LOADS_MAX_FAILURES = 3
"""Failed load-endpoint polls in a row, while ``/metrics`` answered, after which an engine is not asked again: one
is a hiccup, three in a row at the scrape interval is an engine that does not serve the endpoint."""

PD_ROLES = frozenset({"prefill", "decode"})
"""Engine roles whose load endpoint is read whatever ``scrape.engine_queued_tokens`` says."""


@runtime_checkable
class LoadsSource(Protocol):
    """An engine adapter whose engine reports each DP rank's load at an endpoint of its own
    (:class:`~gateway.engines.sglang.SglangAdapter`)."""

    loads_path: str
    """The path to GET (with its query)."""

    def parse_loads(self, text: str) -> dict[int, dict[str, float]]:
        """``{dp_rank: {RankMetrics field: value}}`` from the endpoint's body.

        Raises:
            MetricsParseError: the body cannot be read.
        """
        ...


class MetricsScraper(PerEngineLoop):
    """Scrapes every engine's ``/metrics`` on an interval.

    Args:
        client: HTTP client for the scrapes.
        engines: the engines to scrape.
        sink: who takes each scrape's outcome.
        metrics: the gateway's metrics (scrape counters).
        config: scrape interval and timeouts.
        clock: monotonic clock in seconds.
    """

    def __init__(
        self,
        client: EngineClient,
        engines: Sequence[Engine],
        sink: ScrapeSink,
        metrics: GatewayMetrics,
        config: ScrapeConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(client, engines, config.interval_s, "scrape", clock)
        self._sink = sink
        self._metrics = metrics
        self._config = config
        self._loads_failures: dict[str, int] = {}

    async def remove(self, name: str) -> None:
        """Stop scraping engine ``name``."""
        await super().remove(name)
        self._loads_failures.pop(name, None)

    def reads_loads(self, engine: Engine) -> bool:
        """Whether scrapes of ``engine`` also read its per-rank load endpoint (see the module docstring)."""
        return (
            (self._config.engine_queued_tokens or engine.config.role in PD_ROLES)
            and isinstance(engine.adapter, LoadsSource)
            and self._loads_failures.get(engine.name, 0) < LOADS_MAX_FAILURES
        )

    async def _loads(self, engine: Engine) -> dict[int, dict[str, float]] | None:
        """The engine's per-rank load figures, or ``None`` if they cannot be read now. Never raises."""
        adapter = engine.adapter
        assert isinstance(adapter, LoadsSource)
        try:
            url = engine.url(adapter.loads_path)
            text = await self._client.get_text(url, self._config.timeout_s, self._config.max_response_bytes)
            return adapter.parse_loads(text)
        except Exception as exc:  # UpstreamError, MetricsParseError expected; anything else is logged loudly
            if not isinstance(exc, UpstreamError | MetricsParseError):
                log.exception("load poll of %s failed unexpectedly", engine.name)
            log.debug("load poll of %s failed: %s", engine.name, exc)
            return None

    async def once(self, engine: Engine) -> bool:
        """Scrape one engine now and hand the outcome to the sink; return whether it succeeded. Never raises."""
        read_at = self._clock()
        loads = asyncio.create_task(self._loads(engine)) if self.reads_loads(engine) else None
        try:
            url = engine.url(engine.adapter.metrics_path)
            text = await self._client.get_text(url, self._config.timeout_s, self._config.max_response_bytes)
            ranks = await asyncio.to_thread(engine.adapter.parse_metrics, text)
        except Exception as exc:  # UpstreamError, MetricsParseError expected; anything else is a bug, logged loudly
            if loads is not None:
                loads.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loads
            self._sink.on_scrape_failure(engine.name, self._clock())
            self._metrics.scrapes.labels(engine.name, "error").inc()
            self._metrics.scrape_errors.labels(engine.name).inc()
            if isinstance(exc, UpstreamError | MetricsParseError):
                log.debug("scrape of %s failed: %s", engine.name, exc)
            else:
                log.exception("scrape of %s failed unexpectedly", engine.name)
            return False
        if loads is not None:
            ranks = self._with_loads(engine, ranks, await loads, read_at)
        self._sink.on_scrape(
            engine.name, {r: m for r, m in ranks.items() if 0 <= r < engine.config.dp_size}, self._clock()
        )
        self._metrics.scrapes.labels(engine.name, "ok").inc()
        return True

    def _with_loads(
        self, engine: Engine, ranks: dict[int, RankMetrics], loads: dict[int, dict[str, float]] | None, read_at: float
    ) -> dict[int, RankMetrics]:
        """``ranks`` with the figures ``loads`` gives for them, asked for at ``read_at`` (queued prefill tokens only
        when ``scrape.engine_queued_tokens`` is on); counts a failed poll."""
        if loads is None:
            failures = self._loads_failures[engine.name] = self._loads_failures.get(engine.name, 0) + 1
            if failures == LOADS_MAX_FAILURES:
                log.warning(
                    "%s answers /metrics but not its load endpoint (%d failures in a row): "
                    "its ranks stay on /metrics and local accounting",
                    engine.name,
                    failures,
                )
            return ranks
        self._loads_failures[engine.name] = 0
        out = dict(ranks)
        for rank, fields in loads.items():
            if rank not in ranks:
                continue
            if not self._config.engine_queued_tokens:
                fields = {k: v for k, v in fields.items() if k != "queued_prefill_tokens"}
            if fields:
                out[rank] = dataclasses.replace(ranks[rank], **fields, queued_read_at=read_at)
        return out
