"""Fault injection for the simulated engines: make one misbehave on command, from a test or a soak run.

A :class:`FaultPlan` is set with ``PUT /_sim/faults`` (JSON body, the fields below), read with
``GET /_sim/faults`` (the plan plus how many faults were injected so far) and cleared with
``DELETE /_sim/faults``. From Python, assign ``MockEngineHandle.faults`` in-process (see
:func:`gateway.sim.mock_engine.app.create_mock_engine_app`). What each fault imitates:

- ``generate="http_500"``: the engine answers ``500`` with its flavour's error body (an internal error).
- ``generate="hang"``: the engine takes the request and never answers; it notices the client leaving.
- ``generate="kill_mid_stream"``: the engine process dies while answering. The connection is dropped after
  ``after_chunks`` token events of a stream (after half the body of a non-streamed answer), and the request is
  aborted in the engine, counted as aborted like vLLM and SGLang do.
- ``generate="end_without_done"``: the stream ends cleanly after ``after_chunks`` events, with no ``[DONE]``.
- ``generate="stall_mid_stream"``: the stream goes silent after ``after_chunks`` events (a hung engine that had
  started answering) until the client leaves.
- ``generate="error_event"``: the engine meets an internal error after its headers: a streamed request gets HTTP
  200, one error event in the flavour's shape and ``[DONE]`` (what SGLang and vLLM send), a non-streamed one the
  flavour's 500.
- ``generate="transfer_fail"`` (a P/D decode engine, :mod:`gateway.sim.mock_engine.pd`): the KV transfer of a
  request breaks once the prefill side has the KV, as a failed RDMA transfer does; the decode leg fails as the
  engine fails it (and tells its prefill). On other engines, and for the other faults on P/D legs, the faults
  apply as above.
- ``health="fail"`` / ``"hang"``: ``GET /health`` answers 503 / never answers.
- ``metrics="garbage"`` / ``"hang"`` / ``"slow"``: ``GET /metrics`` answers text that is not Prometheus
  exposition / never answers / answers after ``metrics_delay_s``.

``ranks`` limits request faults to those DP ranks (all when ``None``) and ``remaining`` to that many requests
(then the plan goes back to ``"ok"``; without limit when ``None``).

An engine that dies outright is served by :func:`killable_server`: :meth:`KillableServer.kill` stops listening,
resets every open connection and ends every request being served at once, as the kernel does to a killed process's
sockets (the app's lifespan shutdown then runs, only to free this process's resources: nothing of it is seen from
outside any more).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Literal

import uvicorn
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

GenerateFault = Literal[
    "ok", "http_500", "error_event", "hang", "kill_mid_stream", "end_without_done", "stall_mid_stream", "transfer_fail"
]


class FaultPlan(BaseModel):
    """What a simulated engine does wrong (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    generate: GenerateFault = "ok"
    ranks: list[int] | None = None
    after_chunks: int = Field(default=2, ge=0)
    remaining: int | None = Field(default=None, ge=0)
    health: Literal["ok", "fail", "hang"] = "ok"
    metrics: Literal["ok", "garbage", "hang", "slow"] = "ok"
    metrics_delay_s: float = Field(default=0.0, ge=0)


class InjectedCrash(Exception):
    """Raised inside a response to make the server drop the connection (an injected engine crash)."""


class _DropInjectedCrashes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], InjectedCrash))


def silence_injected_crashes() -> None:
    """Keep uvicorn from logging a traceback for each injected crash (idempotent)."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DropInjectedCrashes) for f in logger.filters):
        logger.addFilter(_DropInjectedCrashes())


class FaultInjector:
    """Holds the current plan and counts what was injected."""

    def __init__(self) -> None:
        self.plan = FaultPlan()
        self.injected: dict[str, int] = {}

    def request_fault(self, rank: int) -> GenerateFault:
        """The fault to inject into a request placed on ``rank`` (``"ok"`` for none); counts it."""
        plan = self.plan
        if plan.generate == "ok" or (plan.ranks is not None and rank not in plan.ranks):
            return "ok"
        if plan.remaining is not None:
            if plan.remaining == 0:
                return "ok"
            plan.remaining -= 1
        self.count(plan.generate)
        return plan.generate

    def count(self, kind: str) -> None:
        """Count one injected fault of ``kind``."""
        self.injected[kind] = self.injected.get(kind, 0) + 1

    def describe(self) -> dict[str, object]:
        """The plan and the counts, for ``GET /_sim/faults``."""
        return {"plan": self.plan.model_dump(), "injected": dict(self.injected)}


class HangResponse(Response):
    """Never answers; returns when the client disconnects (a hung engine that still notices a closed socket)."""

    def __init__(self) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await wait_for_disconnect(receive)


async def wait_for_disconnect(receive: Receive) -> None:
    """Return once the client has disconnected (every other ASGI message is dropped)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class KillableServer:
    """A uvicorn server in this event loop that can be killed (see the module docstring).

    Attributes:
        url: its base URL, ``http://host:port``.
        killed: whether :meth:`kill` ran.
    """

    def __init__(
        self,
        server: uvicorn.Server,
        task: asyncio.Task[None],
        sock: socket.socket,
        url: str,
        on_kill: Callable[[], None] | None = None,
    ) -> None:
        self._server, self._task, self._sock, self._on_kill = server, task, sock, on_kill
        self.url = url
        self.killed = False

    async def kill(self) -> None:
        """Die at once: refuse new connections, reset the open ones (no answer, no end of stream) and end every
        request being served; idempotent."""
        if self.killed:
            return
        self.killed = True
        if self._on_kill is not None:
            self._on_kill()
        server = self._server
        for listener in server.servers:
            listener.close()
        self._sock.close()
        self._reset_connections()
        ended = _DropEndedRequests(set(server.server_state.tasks))
        logger = logging.getLogger("uvicorn.error")
        logger.addFilter(ended)
        try:
            for task in ended.tasks:
                task.cancel()
            await self.stop()
        finally:
            logger.removeFilter(ended)
        self._reset_connections()  # accepted while the listener closed: set up only after the first sweep

    def _reset_connections(self) -> None:
        for connection in list(self._server.server_state.connections):
            transport = getattr(connection, "transport", None)
            if isinstance(transport, asyncio.Transport):
                transport.abort()

    async def stop(self) -> None:
        """Shut down as uvicorn does (after :meth:`kill`: free what is left of it in this process)."""
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class _DropEndedRequests(logging.Filter):
    """Drops uvicorn's report of the requests a kill ended (logged from their own tasks)."""

    def __init__(self, tasks: set[asyncio.Task[None]]) -> None:
        super().__init__()
        self.tasks = tasks

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return asyncio.current_task() not in self.tasks
        except RuntimeError:  # no running loop
            return True


@contextlib.asynccontextmanager
async def killable_server(
    app: ASGIApp, host: str = "127.0.0.1", on_kill: Callable[[], None] | None = None
) -> AsyncIterator[KillableServer]:
    """Serve ``app`` with uvicorn on a free port of ``host`` in the current event loop until the context ends or
    the server is killed (:meth:`KillableServer.kill`, which first calls ``on_kill``: the app stops talking to
    anyone, as a dead process does).

    Raises:
        RuntimeError: the server failed to start.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=5
    )
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name=f"uvicorn-killable-{port}")
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError(f"server on {host}:{port} exited during startup")
        await asyncio.sleep(0.01)
    url_host = f"[{host}]" if ":" in host else host
    handle = KillableServer(server, task, sock, f"http://{url_host}:{port}", on_kill)
    try:
        yield handle
    finally:
        await handle.stop()
        sock.close()


class _QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
