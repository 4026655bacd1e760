"""Async scraper of the engines' ``/metrics``, feeding the load view.

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

from gateway.config import ScrapeConfig
from gateway.engines import Engine, MetricsParseError
from gateway.engines.client import EngineClient
from gateway.errors import UpstreamError
from gateway.load.engine_loop import PerEngineLoop
from gateway.load.view import LoadView
from gateway.telemetry import GatewayMetrics

log = logging.getLogger(__name__)


class MetricsScraper(PerEngineLoop):
    """Scrapes every engine's ``/metrics`` on an interval.

    Args:
        client: HTTP client for the scrapes.
        engines: the engines to scrape.
        view: the load view to update.
        metrics: the gateway's metrics (scrape counters).
        config: scrape interval and timeouts.
        on_update: called after each successful scrape (the dispatcher re-checks its window).
        clock: monotonic clock in seconds.
    """

    def __init__(
        self,
        client: EngineClient,
        engines: Sequence[Engine],
        view: LoadView,
        metrics: GatewayMetrics,
        config: ScrapeConfig,
        *,
        on_update: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(client, engines, config.interval_s, "scrape", clock)
        self._view = view
        self._metrics = metrics
        self._config = config
        self._on_update = on_update

    async def once(self, engine: Engine) -> bool:
        """Scrape one engine now and update the view; return whether it succeeded. Never raises."""
        try:
            url = engine.url(engine.adapter.metrics_path)
            text = await self._client.get_text(url, self._config.timeout_s, self._config.max_response_bytes)
            ranks = await asyncio.to_thread(engine.adapter.parse_metrics, text)
        except Exception as exc:  # UpstreamError, MetricsParseError expected; anything else is a bug, logged loudly
            self._view.on_scrape_failure(engine.name, self._clock())
            self._metrics.scrapes.labels(engine.name, "error").inc()
            self._metrics.scrape_errors.labels(engine.name).inc()
            if isinstance(exc, UpstreamError | MetricsParseError):
                log.debug("scrape of %s failed: %s", engine.name, exc)
            else:
                log.exception("scrape of %s failed unexpectedly", engine.name)
            return False
        self._view.on_scrape(
            engine.name, {r: m for r, m in ranks.items() if 0 <= r < engine.config.dp_size}, self._clock()
        )
        self._metrics.scrapes.labels(engine.name, "ok").inc()
        if self._on_update is not None:
            self._on_update()
        return True
