"""Async scraper of the engines' ``/metrics``, feeding each outcome to a :class:`ScrapeSink` (the dispatcher, which
hands it to the scheduler's progress protocol).

Each engine is scraped on its own schedule (``scrape.interval_s``) with a total timeout (``scrape.timeout_s``)
and a size bound (``scrape.max_response_bytes``), so a slow, hung or flooding engine delays nobody else. The
text is parsed in a worker thread: a large body (a vLLM server with many DP ranks exports hundreds of KB,
several milliseconds of parsing per 50 KB) does not stall the event loop that closes windows and relays streams.
A failed or unparsable scrape is counted and leaves the load view on local accounting for that engine; so
does an unexpected error (logged with its traceback): nothing an engine sends can end its scraping loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

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

    async def once(self, engine: Engine) -> bool:
        """Scrape one engine now and hand the outcome to the sink; return whether it succeeded. Never raises."""
        try:
            url = engine.url(engine.adapter.metrics_path)
            text = await self._client.get_text(url, self._config.timeout_s, self._config.max_response_bytes)
            ranks = await asyncio.to_thread(engine.adapter.parse_metrics, text)
        except Exception as exc:  # UpstreamError, MetricsParseError expected; anything else is a bug, logged loudly
            self._sink.on_scrape_failure(engine.name, self._clock())
            self._metrics.scrapes.labels(engine.name, "error").inc()
            self._metrics.scrape_errors.labels(engine.name).inc()
            if isinstance(exc, UpstreamError | MetricsParseError):
                log.debug("scrape of %s failed: %s", engine.name, exc)
            else:
                log.exception("scrape of %s failed unexpectedly", engine.name)
            return False
        self._sink.on_scrape(
            engine.name, {r: m for r, m in ranks.items() if 0 <= r < engine.config.dp_size}, self._clock()
        )
        self._metrics.scrapes.labels(engine.name, "ok").inc()
        return True
