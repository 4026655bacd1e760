"""A task per engine that runs one action at start and then on an interval (the scraper and the prober)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from gateway.engines import Engine
from gateway.engines.client import EngineClient


class PerEngineLoop(ABC):
    """Runs :meth:`once` for every engine concurrently at :meth:`start`, then every ``interval_s`` seconds on
    one task per engine (the time :meth:`once` took counts towards the interval), so a slow or hung engine
    delays nobody else.

    Args:
        client: HTTP client towards the engines.
        engines: the engines.
        interval_s: time between two starts of :meth:`once` for one engine, seconds.
        task_prefix: asyncio task names are ``<task_prefix>-<engine>``.
        clock: monotonic clock in seconds.
    """

    def __init__(
        self,
        client: EngineClient,
        engines: Sequence[Engine],
        interval_s: float,
        task_prefix: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._engines = list(engines)
        self._interval_s = interval_s
        self._task_prefix = task_prefix
        self._clock = clock
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping = False
        self._started = False

    @abstractmethod
    async def once(self, engine: Engine) -> bool:
        """Do the action for one engine now; return whether it succeeded. Must never raise."""

    async def _loop(self, engine: Engine) -> None:
        elapsed = 0.0
        while not self._stopping:
            await asyncio.sleep(max(0.0, self._interval_s - elapsed))
            started = self._clock()
            await self.once(engine)
            elapsed = self._clock() - started

    async def start(self) -> None:
        """Run :meth:`once` for every engine, then keep running it on the interval."""
        await asyncio.gather(*(self.once(e) for e in self._engines))
        for engine in self._engines:
            self._spawn(engine)
        self._started = True

    def _spawn(self, engine: Engine) -> None:
        self._tasks[engine.name] = asyncio.create_task(self._loop(engine), name=f"{self._task_prefix}-{engine.name}")

    @property
    def engine_names(self) -> list[str]:
        """The engines it runs for."""
        return [e.name for e in self._engines]

    async def add(self, engine: Engine) -> bool:
        """Take ``engine`` in at runtime: run :meth:`once` for it now, then (once started) on the interval; return
        what :meth:`once` returned.

        Raises:
            ValueError: an engine of that name is already taken in.
        """
        if any(e.name == engine.name for e in self._engines):
            raise ValueError(f"engine {engine.name!r} is already taken in")
        self._engines.append(engine)
        ok = await self.once(engine)
        if self._started and not self._stopping and any(e is engine for e in self._engines):
            self._spawn(engine)
        return ok

    async def remove(self, name: str) -> None:
        """Stop running for engine ``name`` (its task ends before this returns); unknown names are ignored."""
        self._engines = [e for e in self._engines if e.name != name]
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def stop(self) -> None:
        """Stop the tasks and wait until they have ended.

        A loop also checks a stop flag between two runs of :meth:`once`, so it ends even if a library it awaits
        swallows the cancellation (aiohttp's own timeouts did, see
        :meth:`gateway.engines.client.EngineClient.get_text`).
        """
        self._stopping = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = {}
