"""Running ASGI apps under uvicorn inside an existing event loop (embedded engines, tests, local stack), and the
event loop ``gateway serve`` runs on (:func:`run`)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from types import FrameType
from typing import Any, TypeVar

import uvicorn
from starlette.types import ASGIApp

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new uvloop event loop (libuv), asyncio's own on Windows, which uvloop does not
    support. uvloop runs the relay's sockets, timers and tasks with a fraction of asyncio's CPU time
    (``bench/results/dataplane.md``); uvicorn picks it for the loops it creates, but ``gateway serve`` creates its
    own."""
    if sys.platform == "win32":
        return asyncio.run(main)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose shutdown (SIGTERM, SIGINT) first calls ``on_drain`` (the gateway app's
    :func:`~gateway.server.app.begin_drain`, which puts it in draining mode).

    Then uvicorn's own graceful shutdown runs: it stops accepting connections, closes idle keep-alive ones, lets
    requests in flight (those still waiting in the staggered window included: the window keeps closing) finish
    for up to ``timeout_graceful_shutdown`` seconds, cancels what is left (which aborts it at the engines), and
    runs the app's lifespan shutdown. While draining, ``/ready`` answers 503. The process then exits with 0.

    Args:
        config: uvicorn's configuration.
        on_drain: called at each shutdown signal, before uvicorn's own handling.
    """

    def __init__(self, config: uvicorn.Config, *, on_drain: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_drain = on_drain

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's signal handling, minus its re-raising of the signal once shut down: after a graceful
        drain the process exits with status 0 rather than dying of the signal (143)."""
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_drain()
        super().handle_exit(sig, frame)


class _QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the process's main server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serve_in_background(
    app: ASGIApp, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning"
) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn in the current event loop for the duration of the context.

    Args:
        app: the ASGI app (its lifespan runs).
        host: address to bind.
        port: port to bind; 0 picks a free one.
        log_level: uvicorn's log level.

    Yields:
        The base URL, ``http://host:port``, once the server accepts connections.

    Raises:
        RuntimeError: the server failed to start.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    # log_config=None: uvicorn's loggers keep the process's logging setup (gateway.logs.configure_logging) instead
    # of uvicorn installing its own handlers and format
    config = uvicorn.Config(
        app, log_level=log_level, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=5
    )
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name=f"uvicorn-{bound_port}")
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError(f"server on {host}:{bound_port} exited during startup")
            await asyncio.sleep(0.01)
        url_host = f"[{host}]" if ":" in host else host
        yield f"http://{url_host}:{bound_port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()
