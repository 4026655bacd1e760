"""Simulated engines and a gateway on loopback: the one way to stand them up, in the current event loop.

The embedded default (``gateway serve`` without engines), ``gateway stack`` and the tests use it. Each server is
uvicorn serving its app in this process's event loop (:func:`gateway.serving.serve_in_background`), on a port the
OS picks, so that nothing collides:

- :func:`simulated_engines`: simulated engines (:mod:`gateway.sim.mock_engine`) of the given flavours, DP sizes,
  models and P/D roles; yields their gateway engine configurations;
- :func:`running_gateway`: the gateway app built from settings; yields its base URL.

And for servers in other processes (Prometheus, ``gateway serve`` as a subprocess, the benchmarks' processes):

- :func:`free_port`: a port nothing listens on right now;
- :func:`wait_ready`: poll a URL until it answers 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from gateway.config import EngineConfig, EngineFlavor, EngineRole, KvConnector, Settings
from gateway.server.app import create_app
from gateway.serving import serve_in_background
from gateway.sim.mock_engine.app import MockEngineConfig, create_mock_engine_app

LOOPBACK = "127.0.0.1"


class NotReady(RuntimeError):
    """A server did not answer 200 in time, or its process exited first."""


@dataclass(frozen=True)
class SimulatedEngine:
    """One simulated engine instance to start."""

    name: str
    """The engine's name in the gateway configuration."""
    flavor: EngineFlavor
    """Whose HTTP API and metrics it imitates: ``"sglang"`` or ``"vllm"``."""
    dp_size: int
    """Number of DP ranks."""
    model: str
    """The one model it serves."""
    role: EngineRole = "mixed"
    """``"mixed"``, or one pool of a P/D model: ``"prefill"`` or ``"decode"`` (:mod:`gateway.sim.mock_engine.pd`)."""
    kv_connector: KvConnector | None = None
    """A vLLM prefill or decode engine's KV connector, ``"nixl"`` or ``"mooncake"``; ``None`` elsewhere."""


@contextlib.asynccontextmanager
async def simulated_engines(
    specs: Sequence[SimulatedEngine], speed: float = 1.0, host: str = LOOPBACK
) -> AsyncIterator[list[EngineConfig]]:
    """Start one simulated engine per spec, each on a free port of ``host``; stop them all on exit.

    Args:
        specs: the engines to start, in order.
        speed: the engines' clock speed, engine seconds per wall-clock second (1.0 = real time).
        host: address to bind.

    The engines keep stored Responses (:attr:`~gateway.sim.mock_engine.app.MockEngineConfig.response_store`), so the
    embedded default and ``gateway stack`` serve ``previous_response_id`` follow-ups.

    Yields:
        The gateway's engine configurations, one per spec in the same order, each with the URL it listens on; with
        its ``role`` and ``kv_connector``, and a prefill engine that serves a bootstrap server (SGLang, vLLM
        Mooncake) with ``bootstrap_port`` = its HTTP port, where the simulated engines rendezvous.
    """
    async with contextlib.AsyncExitStack() as exits:
        engines = []
        for spec in specs:
            mock = MockEngineConfig(
                spec.flavor,
                spec.dp_size,
                model=spec.model,
                speed=speed,
                role=spec.role,
                kv_connector=spec.kv_connector or "nixl",
                response_store=True,  # as an engine started with its store flag: the Responses API works whole
            )
            url = await exits.enter_async_context(serve_in_background(create_mock_engine_app(mock), host))
            engine = EngineConfig(
                name=spec.name,
                flavor=spec.flavor,
                url=url,
                dp_size=spec.dp_size,
                models=[spec.model],
                role=spec.role,
                kv_connector=spec.kv_connector,
            )
            if engine.bootstrap_address is not None:
                engine = engine.model_copy(update={"bootstrap_port": int(url.rsplit(":", 1)[1])})
            engines.append(engine)
        yield engines


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Settings, *, host: str = LOOPBACK, port: int = 0, **create_app_kwargs: Any
) -> AsyncIterator[str]:
    """Serve the gateway built by ``create_app(settings, **create_app_kwargs)``; stop it on exit.

    Args:
        settings: the gateway's settings (``settings.host`` and ``settings.port`` are not used).
        host: address to bind.
        port: port to bind; 0 picks a free one.
        create_app_kwargs: passed on to :func:`gateway.server.app.create_app` (e.g. ``tokenizer``).

    Yields:
        The gateway's base URL, ``http://host:port``, once its lifespan has started (not necessarily ready: see
        :func:`wait_ready` on ``/ready``).
    """
    async with serve_in_background(create_app(settings, **create_app_kwargs), host, port) as url:
        yield url


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on at ``host`` right now (for a server in another process, which must be told
    its port; a server in this process binds port 0 instead)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def wait_ready(
    url: str,
    *,
    timeout_s: float = 30.0,
    is_alive: Callable[[], bool] = lambda: True,
    interval_s: float = 0.2,
) -> None:
    """Poll ``url`` with GET until it answers 200.

    Args:
        url: the full URL to poll (e.g. ``http://127.0.0.1:8000/ready``).
        timeout_s: how long to keep trying, seconds.
        is_alive: whether the process serving ``url`` still runs; polling stops when it returns ``False``.
        interval_s: pause between polls, seconds.

    Raises:
        NotReady: no 200 within ``timeout_s``, or ``is_alive()`` turned ``False``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with httpx.AsyncClient(timeout=2.0) as client:
        while is_alive():
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == 200:
                    return
            if loop.time() >= deadline:
                raise NotReady(f"{url} did not answer 200 within {timeout_s:g} s")
            await asyncio.sleep(interval_s)
    raise NotReady(f"the process serving {url} exited before it was ready")
