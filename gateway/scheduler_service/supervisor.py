"""``gateway serve --workers N`` (N > 1): N front-door processes on one port and the scheduler service they share,
started and watched by the ``gateway serve`` process.

- The service runs in a child process of its own, on a Unix socket in a private temporary directory; the front
  doors' ``scheduler_service.url`` points at it (the section's other settings are kept, or defaulted).
- Each front door is a child process running the usual app under uvicorn, listening on the same port with
  ``SO_REUSEPORT``: the kernel spreads new connections over the listening processes (Linux ``socket(7)``). The
  supervisor binds the port first, without listening, so that port 0 resolves to one port for all and the port
  stays held while a worker restarts.
- Without engines in the configuration, the embedded simulated engines run in the supervisor process.
- A child that dies is restarted (the front doors schedule locally while the service restarts); more than
  :data:`MAX_RESTARTS` deaths within :data:`RESTART_WINDOW_S` stop everything with exit status 1.
- SIGHUP: passed on to every child, each of which reloads the configuration file itself
  (:mod:`gateway.server.reload`): the same file, validated the same way, gives the front doors and the service the
  same engines; the supervisor reads it too, so that a child restarted later starts with them. The engine set is
  changed this way only: the admin API's changes are refused on a front door, since they would reach one process.
- SIGINT or SIGTERM: the front doors are told first (each drains as a single gateway does), then the service;
  children still running after ``shutdown.drain_timeout_s`` plus :data:`STOP_GRACE_S` are killed. Should the
  supervisor itself be killed, the kernel sends each child SIGTERM (Linux's parent-death signal).

Children are started with the ``spawn`` method (a fresh interpreter: no event loop or lock inherited from the
supervisor), so everything they receive is picklable: the settings, the address, the log level.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.process
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gateway import serving
from gateway.config import ConfigError, SchedulerServiceConfig, Settings

if TYPE_CHECKING:
    from gateway.server.reload import ConfigSource

log = logging.getLogger("gateway.supervisor")

MAX_RESTARTS = 5
"""Child deaths tolerated within :data:`RESTART_WINDOW_S` before the supervisor gives up (exit status 1)."""
RESTART_WINDOW_S = 60.0
"""The window over which child deaths are counted, seconds."""
STOP_GRACE_S = 5.0
"""Time beyond ``shutdown.drain_timeout_s`` a child gets to exit after SIGTERM before it is killed, seconds."""
POLL_S = 0.2
"""How often the supervisor looks at its children, seconds."""
SERVICE_START_TIMEOUT_S = 60.0
"""Longest wait for the scheduler service to answer its first health probe, seconds."""


def _reuseport_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


PR_SET_PDEATHSIG = 1
"""Linux ``prctl`` option: the signal a process gets when its parent dies (``<linux/prctl.h>``, ``prctl(2)``)."""


def _die_with_parent() -> None:
    """Have the kernel send this child SIGTERM if the supervisor dies (even of SIGKILL), so no front door or service
    outlives it (Linux; elsewhere nothing happens)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def front_door_main(
    settings: Settings, log_level: str, worker: int, source: ConfigSource | None = None, embedded: bool = False
) -> None:
    """A front-door child: the gateway app under uvicorn on ``settings.host:settings.port`` (``SO_REUSEPORT``);
    SIGHUP reloads ``source`` (the gateway runs embedded engines when ``embedded``)."""
    from gateway.logs import configure_logging
    from gateway.server.reload import defer_sighup

    defer_sighup()  # until the reload handler is in place: a SIGHUP neither ends it nor is lost
    _die_with_parent()
    configure_logging(log_level, settings.log.format)
    with contextlib.suppress(KeyboardInterrupt):
        serving.run(_front_door(settings, log_level, worker, source, embedded))


async def _front_door(
    settings: Settings, log_level: str, worker: int, source: ConfigSource | None, embedded: bool
) -> None:
    import uvicorn

    from gateway.server.app import begin_drain, create_app
    from gateway.server.reload import ReloadOnSignal
    from gateway.server.state import GatewayState
    from gateway.serving import DrainingServer

    sock = _reuseport_socket(settings.host, settings.port)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        log_level=log_level,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=settings.shutdown.drain_timeout_s,
    )
    log.info("front door %d (pid %d) serving on port %d", worker, _pid(), settings.port)

    def running_state() -> GatewayState | None:
        state = getattr(app.state, "gateway", None)
        return state if isinstance(state, GatewayState) else None

    with ReloadOnSignal(running_state, source, embedded=embedded):
        await DrainingServer(config, on_drain=lambda: begin_drain(app)).serve(sockets=[sock])


def service_main(
    settings: Settings, log_level: str, unix_path: str, source: ConfigSource | None = None, embedded: bool = False
) -> None:
    """The scheduler service's child: serves on ``unix_path`` until SIGTERM (SIGINT is ignored: the supervisor stops
    the service last); SIGHUP reloads ``source``."""
    from gateway.logs import configure_logging
    from gateway.server.reload import defer_sighup

    defer_sighup()  # until the reload handler is in place: a SIGHUP neither ends it nor is lost
    _die_with_parent()
    configure_logging(log_level, settings.log.format)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every child: the service stops last, on SIGTERM
    serving.run(
        serve_scheduler(settings, unix_path=unix_path, signals=(signal.SIGTERM,), source=source, embedded=embedded)
    )


async def serve_scheduler(
    settings: Settings,
    *,
    host: str | None = None,
    port: int = 0,
    unix_path: str | None = None,
    signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
    source: ConfigSource | None = None,
    embedded: bool = False,
) -> None:
    """Run the scheduler service until one of ``signals`` (``gateway scheduler``, and the service's child); SIGHUP
    reloads ``source`` (:mod:`gateway.server.reload`)."""
    from gateway.scheduler_service.service import running_service
    from gateway.server.reload import ReloadOnSignal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    async with running_service(settings, host=host, port=port, unix_path=unix_path) as (service, _):
        with ReloadOnSignal(lambda: service.state, source, embedded=embedded):
            await stop.wait()
    log.info("scheduler service stopped")


def _pid() -> int:
    import os

    return os.getpid()


def _start_with_sighup_held(process: multiprocessing.process.BaseProcess) -> None:
    """Start ``process`` with SIGHUP blocked: a child inherits the blocked mask through ``exec`` (POSIX
    ``execve(2)``: the signal mask and pending signals are kept), so a SIGHUP passed on while the child starts stays
    pending until its :func:`~gateway.server.reload.defer_sighup` takes it (instead of ending the child by SIGHUP's
    default action before any Python handler is in place)."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


@dataclass(slots=True)
class _Child:
    """One supervised child: how to start it, and the running process."""

    name: str
    start: Callable[[], multiprocessing.process.BaseProcess]
    process: multiprocessing.process.BaseProcess | None = None
    deaths: list[float] = field(default_factory=list)


class Supervisor:
    """Starts the service and the front doors, restarts dead children, stops them all on a signal.

    Args:
        settings: the gateway settings, engines included (the embedded ones already started).
        workers: the number of front-door processes (2 or more).
        log_level: the children's log level.
        socket_dir: the directory of the service's Unix socket.
    """

    def __init__(
        self,
        settings: Settings,
        workers: int,
        log_level: str,
        socket_dir: Path,
        source: ConfigSource | None = None,
        embedded: bool = False,
    ) -> None:
        self.source = source
        self.embedded = embedded
        self.context = multiprocessing.get_context("spawn")
        self.unix_path = str(socket_dir / "scheduler.sock")
        base = settings.scheduler_service or SchedulerServiceConfig(url="unix:/")
        service = base.model_copy(update={"url": f"unix:{self.unix_path}"})
        self.front_settings = settings.model_copy(update={"scheduler_service": service})
        self.settings = settings
        self.log_level = log_level
        self.service = _Child("scheduler service", self._start_service)
        self.front_doors = [_Child(f"front door {i}", self._front_door_starter(i)) for i in range(workers)]
        self.stopping = False
        self.failed = False

    def _start_service(self) -> multiprocessing.process.BaseProcess:
        process = self.context.Process(
            target=service_main,
            args=(self.settings, self.log_level, self.unix_path, self.source, self.embedded),
            name="gateway-scheduler",
        )
        _start_with_sighup_held(process)
        return process

    def _front_door_starter(self, worker: int) -> Callable[[], multiprocessing.process.BaseProcess]:
        def start() -> multiprocessing.process.BaseProcess:
            process = self.context.Process(
                target=front_door_main,
                args=(self.front_settings, self.log_level, worker, self.source, self.embedded),
                name=f"gateway-front-door-{worker}",
            )
            _start_with_sighup_held(process)
            return process

        return start

    @property
    def children(self) -> list[_Child]:
        return [self.service, *self.front_doors]

    async def run(self) -> int:
        """Run until a signal (exit status 0) or too many deaths (1)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)
        from gateway.server.reload import take_noted_sighup

        if take_noted_sighup():  # one arrived while the supervisor started (gateway serve's defer_sighup)
            self._on_reload()
        try:
            self.service.process = self.service.start()
            try:
                await self._wait_for_service()
            except RuntimeError as exc:
                log.error("%s: stopping", exc)
                self.failed = self.stopping = True
            for child in self.front_doors:
                if not self.stopping:
                    child.process = child.start()
            log.info(
                "gateway (%s) on http://%s:%d/v1: %d front doors, scheduler service on unix:%s",
                self.settings.policy,
                self.settings.host,
                self.settings.port,
                len(self.front_doors),
                self.unix_path,
            )
            while not self.stopping:
                await asyncio.sleep(POLL_S)
                self._restart_dead()
        finally:
            await self._stop_all()
        return 1 if self.failed else 0

    def _on_reload(self) -> None:
        """SIGHUP: every child reloads the configuration itself; the supervisor takes the file's engines for the
        children it starts from now on (a file that does not validate changes nothing, here as in the children)."""
        for child in self.children:
            if child.process is not None and child.process.is_alive() and child.process.pid is not None:
                os.kill(child.process.pid, signal.SIGHUP)
        if self.source is None or self.embedded:
            return
        try:
            engines = self.source.load().engines
        except ConfigError as exc:
            log.error("SIGHUP: configuration not valid, the children keep theirs: %s", str(exc).replace("\n", " "))
            return
        self.settings = self.settings.model_copy(update={"engines": engines})
        self.front_settings = self.front_settings.model_copy(update={"engines": engines})
        log.info(
            "SIGHUP: passed on to the front doors and the scheduler service (engines now %s)", [e.name for e in engines]
        )

    def _on_signal(self, sig: int) -> None:
        if not self.stopping:
            log.info("%s: stopping the front doors, then the scheduler service", signal.Signals(sig).name)
        self.stopping = True

    async def _wait_for_service(self) -> None:
        from gateway.scheduler_service.client import ServiceClient, ServiceUnavailable

        client = ServiceClient(SchedulerServiceConfig(url=f"unix:{self.unix_path}", deadline_s=1.0))
        await client.start()
        try:
            deadline = time.monotonic() + SERVICE_START_TIMEOUT_S
            while True:
                try:
                    await client.health()
                    return
                except ServiceUnavailable:
                    process = self.service.process
                    if process is not None and not process.is_alive():
                        raise RuntimeError(
                            f"the scheduler service exited at start (status {process.exitcode})"
                        ) from None
                    if time.monotonic() > deadline or self.stopping:
                        raise RuntimeError("the scheduler service did not answer") from None
                    await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    def _restart_dead(self) -> None:
        now = time.monotonic()
        for child in self.children:
            process = child.process
            if process is None or process.is_alive() or self.stopping:
                continue
            child.deaths = [t for t in child.deaths if now - t < RESTART_WINDOW_S] + [now]
            if len(child.deaths) > MAX_RESTARTS:
                log.error(
                    "%s died %d times within %g s (last exit status %s): stopping",
                    child.name,
                    len(child.deaths),
                    RESTART_WINDOW_S,
                    process.exitcode,
                )
                self.failed = self.stopping = True
                return
            log.warning("%s (pid %s) exited with status %s: restarting it", child.name, process.pid, process.exitcode)
            child.process = child.start()

    async def _stop_all(self) -> None:
        grace = self.settings.shutdown.drain_timeout_s + STOP_GRACE_S
        for group in (self.front_doors, [self.service]):
            running = [c.process for c in group if c.process is not None and c.process.is_alive()]
            for process in running:
                process.terminate()
            for _ in range(int(grace / POLL_S) + 1):
                if not any(p.is_alive() for p in running):
                    break
                await asyncio.sleep(POLL_S)
            for process in running:
                if process.is_alive():
                    log.warning("%s did not stop within %g s: killing it", process.name, grace)
                    process.kill()
                process.join(timeout=5)


async def supervise(
    settings: Settings, workers: int, log_level: str, *, source: ConfigSource | None = None, embedded: bool = False
) -> int:
    """Run ``workers`` front doors and the scheduler service (module docstring); return the exit status. SIGHUP
    reloads ``source`` in every child (``embedded``: the engines are the embedded simulated ones).

    The port is held by the supervisor (bound with ``SO_REUSEPORT``, not listening) for the whole run.
    """
    reserved = _reuseport_socket(settings.host, settings.port)
    settings = settings.model_copy(update={"port": reserved.getsockname()[1]})
    try:
        with tempfile.TemporaryDirectory(prefix="gateway-") as socket_dir:
            return await Supervisor(settings, workers, log_level, Path(socket_dir), source, embedded).run()
    finally:
        reserved.close()
