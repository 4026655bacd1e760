"""Reloading the configuration file on SIGHUP (``gateway serve --config FILE``).

The file is read again with the same sources and overrides as at start (:class:`ConfigSource`: the file, the
``GATEWAY_*`` environment, the command line's options) and validated as at start. A file that does not validate is
refused: one error log line naming the field, ``gateway_config_reloads_total{result="refused"}``, and the running
configuration stays whole. A valid file's ``engines`` are applied to the running engine set
(:meth:`EngineSet.apply <gateway.engine_set.EngineSet.apply>`): engines added, engines gone drained and
removed once their requests in flight have ended, engines whose entry changed drained, removed and added again;
``gateway_config_reloads_total{result="applied"}``.

Only ``engines`` reloads. Every other setting is built into the running gateway's parts at start (the policy and
the window into the scheduler, the scrape and probe intervals into their loops, the keys into the middleware, the
listening address into the server, the models' tokenizers into the prompt counter...): a file that changes one of
them is still applied for its engines, and a warning names each such setting, which takes effect at the next
restart (the running value stays). A gateway that runs its embedded simulated engines (no ``engines`` at start)
keeps them: a reloaded file that lists engines is refused.

With ``gateway serve --workers N`` the supervisor passes SIGHUP on to every front door and to the scheduler service,
and each reloads the file itself (:mod:`gateway.scheduler_service.supervisor`): the same file validated the same way
gives each the same engine set, so the service places only on engines the front doors know. A SIGHUP that reaches
a process still starting is not lost: until :class:`ReloadOnSignal` is installed, :func:`defer_sighup` notes it
(rather than let it end the process), and a reload asked for before the gateway's lifespan has started waits for
it; either way the file is reloaded once the process serves.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config import ConfigError, Settings, load_settings
from gateway.engine_set import EngineSetError
from gateway.server.state import GatewayState

log = logging.getLogger(__name__)

PROCESS_SETTINGS = ("host", "port", "scheduler_service")
"""Settings a process may run with other than the file's (the ``--workers`` supervisor sets the front doors' port
and scheduler service, and the service runs without one): not compared on reload."""


@dataclass(frozen=True, slots=True)
class ConfigSource:
    """Where the settings came from, to read them again (picklable: ``--workers`` children get it).

    Attributes:
        path: the configuration file.
        overrides: the command line's overrides, as given to :func:`~gateway.config.load_settings`.
    """

    path: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Settings:
        """The settings as the file, the environment and the overrides give them now.

        Raises:
            ConfigError: the file is missing or invalid (the message names the field).
        """
        return load_settings(Path(self.path), **self.overrides)


def restart_only_changes(running: Settings, reloaded: Settings) -> list[str]:
    """The settings other than ``engines`` (and :data:`PROCESS_SETTINGS`) whose value differs between ``running``
    and ``reloaded``, by name."""
    skip = {"engines", *PROCESS_SETTINGS}
    return [
        name for name in Settings.model_fields if name not in skip and getattr(running, name) != getattr(reloaded, name)
    ]


async def reload_configuration(state: GatewayState, source: ConfigSource, *, embedded: bool = False) -> bool:
    """Read ``source`` again and apply its engines to ``state`` (module docstring); return whether it was applied.

    Args:
        state: the running gateway (or scheduler service).
        source: where its settings came from.
        embedded: the gateway runs its embedded simulated engines.
    """
    metrics = state.metrics
    try:
        reloaded = await asyncio.to_thread(source.load)
    except ConfigError as exc:
        log.error("configuration reload refused, the running configuration stays: %s", str(exc).replace("\n", " "))
        metrics.config_reloads.labels("refused").inc()
        return False
    engines: Sequence[Any] = reloaded.engines
    if embedded and engines:
        log.error(
            "configuration reload refused, the running configuration stays: the gateway runs its embedded engines "
            "(no engines at start); restart it to route to the engines the file lists"
        )
        metrics.config_reloads.labels("refused").inc()
        return False
    for name in restart_only_changes(state.settings, reloaded):
        log.warning("configuration reload: %s changed in the file; it takes effect at the next restart", name)
    try:
        plan = None if embedded else await state.engine_set.apply(reloaded.engines, "reload")
    except EngineSetError as exc:
        log.error("configuration reload refused, the running configuration stays: %s", exc.message)
        metrics.config_reloads.labels("refused").inc()
        return False
    metrics.config_reloads.labels("applied").inc()
    if plan is None or plan.empty:
        log.info("configuration reloaded: the engines are unchanged")
    else:
        log.info(
            "configuration reloaded: engines added %s, removed %s, replaced %s",
            [e.name for e in plan.add],
            plan.remove,
            [e.name for e in plan.replace],
        )
    return True


_sighup_noted = False
"""A SIGHUP arrived before :class:`ReloadOnSignal` was installed (:func:`defer_sighup`)."""

STARTING_POLL_S = 0.05
"""How often a reload asked for while the gateway starts looks whether it has started, seconds."""


def defer_sighup() -> None:
    """Note a SIGHUP that arrives before :class:`ReloadOnSignal` is installed (its default action would end the
    process, and ignoring it would lose the reload); :class:`ReloadOnSignal` reloads once for it when installed."""

    def note(signum: int, frame: object) -> None:
        global _sighup_noted
        _sighup_noted = True

    signal.signal(signal.SIGHUP, note)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # one held while a --workers child started


def take_noted_sighup() -> bool:
    """Whether a SIGHUP was noted by :func:`defer_sighup` since the last call (the note is cleared)."""
    global _sighup_noted
    noted, _sighup_noted = _sighup_noted, False
    return noted


class ReloadOnSignal:
    """Reloads the configuration on each SIGHUP (:func:`reload_configuration`), one reload at a time, for as long as
    it is installed (a context manager; the signal is ignored after, rather than left to end the process).

    Args:
        get_state: the running gateway's state, ``None`` before its lifespan has started (a SIGHUP then is logged
            and ignored).
        source: where the settings came from; ``None`` when there is no file (a SIGHUP is logged and ignored).
        embedded: the gateway runs its embedded simulated engines.
    """

    def __init__(
        self, get_state: Callable[[], GatewayState | None], source: ConfigSource | None, *, embedded: bool = False
    ) -> None:
        self.get_state = get_state
        self.source = source
        self.embedded = embedded
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def __enter__(self) -> ReloadOnSignal:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.trigger)
        if take_noted_sighup():  # a SIGHUP reached the process while it started (defer_sighup)
            self.trigger()
        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        for task in self._tasks:
            task.cancel()

    def trigger(self) -> None:
        """Start a reload (after the one under way, if any)."""
        task = asyncio.get_running_loop().create_task(self._reload(), name="gateway-config-reload")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload(self) -> None:
        async with self._lock:
            if self.source is None:
                log.warning("SIGHUP: no configuration file to reload (the gateway was started without --config)")
                return
            state = self.get_state()
            if state is None:
                log.info("SIGHUP: the gateway is still starting; the file is reloaded once it has started")
            while state is None:  # ends when the lifespan has started (or the task is cancelled at exit)
                await asyncio.sleep(STARTING_POLL_S)
                state = self.get_state()
            await reload_configuration(state, self.source, embedded=self.embedded)
