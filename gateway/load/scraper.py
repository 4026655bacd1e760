"""Async scraper of the engines' ``/metrics``, feeding the load view.

Each engine is scraped on its own schedule (``scrape.interval_s``) with a total timeout (``scrape.timeout_s``)
and a size bound (``scrape.max_response_bytes``), so a slow, hung or flooding engine delays nobody else. The
text is parsed in a worker thread: a large body (a vLLM server with many DP ranks exports hundreds of KB,
about 7 ms of parsing per 50 KB here) does not stall the event loop that closes windows and relays streams.
A failed or unparsable scrape is counted and leaves the load view on local accounting for that engine; so
does an unexpected error (logged with its traceback): nothing an engine sends can end its scraping loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

import aiohttp

from gateway.config import EngineConfig, ScrapeConfig
from gateway.engines import EngineAdapter, MetricsParseError
from gateway.errors import UpstreamError
from gateway.load.view import LoadView
from gateway.server.upstream import get_text
from gateway.telemetry import GatewayMetrics

log = logging.getLogger(__name__)


class MetricsScraper:
    """Scrapes every engine's ``/metrics`` on an interval.

    Args:
        session: HTTP session for the scrapes.
        engines: ``(engine config, adapter)`` pairs.
        view: the load view to update.
        metrics: the gateway's metrics (scrape counters).
        config: scrape interval and timeouts.
        on_update: called after each successful scrape (the dispatcher re-checks its window).
        clock: monotonic clock in seconds.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        engines: Sequence[tuple[EngineConfig, EngineAdapter]],
        view: LoadView,
        metrics: GatewayMetrics,
        config: ScrapeConfig,
        *,
        on_update: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._engines = list(engines)
        self._view = view
        self._metrics = metrics
        self._config = config
        self._on_update = on_update
        self._clock = clock
        self._tasks: list[asyncio.Task[None]] = []

    async def scrape_once(self, engine: EngineConfig, adapter: EngineAdapter) -> bool:
        """Scrape one engine now and update the view; return whether it succeeded. Never raises."""
        try:
            url = engine.url + adapter.metrics_path
            text = await get_text(self._session, url, self._config.timeout_s, self._config.max_response_bytes)
            ranks = await asyncio.to_thread(adapter.parse_metrics, text)
        except Exception as exc:  # UpstreamError, MetricsParseError expected; anything else is a bug, logged loudly
            self._view.on_scrape_failure(engine.name, self._clock())
            self._metrics.scrapes.labels(engine.name, "error").inc()
            self._metrics.scrape_errors.labels(engine.name).inc()
            if isinstance(exc, UpstreamError | MetricsParseError):
                log.debug("scrape of %s failed: %s", engine.name, exc)
            else:
                log.exception("scrape of %s failed unexpectedly", engine.name)
            return False
        self._view.on_scrape(engine.name, {r: m for r, m in ranks.items() if 0 <= r < engine.dp_size}, self._clock())
        self._metrics.scrapes.labels(engine.name, "ok").inc()
        if self._on_update is not None:
            self._on_update()
        return True

    async def _loop(self, engine: EngineConfig, adapter: EngineAdapter) -> None:
        elapsed = 0.0
        while True:
            await asyncio.sleep(max(0.0, self._config.interval_s - elapsed))
            started = self._clock()
            await self.scrape_once(engine, adapter)
            elapsed = self._clock() - started

    async def start(self) -> None:
        """Scrape every engine once (so ``/ready`` is meaningful at once), then keep scraping."""
        await asyncio.gather(*(self.scrape_once(e, a) for e, a in self._engines))
        self._tasks = [asyncio.create_task(self._loop(e, a), name=f"scrape-{e.name}") for e, a in self._engines]

    async def stop(self) -> None:
        """Stop scraping."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
