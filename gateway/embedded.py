"""The embedded default: simulated engines started in-process, so ``gateway serve`` answers at once.

Two instances of 8 DP ranks, one SGLang-flavoured and one vLLM-flavoured, both serving ``deepseek-v3``, each on a
free loopback port.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from gateway.config import EngineConfig
from gateway.serving import serve_in_background
from gateway.sim.mock_engine.app import MockEngineConfig, create_mock_engine_app

EMBEDDED_MODEL = "deepseek-v3"
EMBEDDED_ENGINES = (("sim-sglang", "sglang", 8), ("sim-vllm", "vllm", 8))
"""``(name, flavour, DP size)`` of each embedded engine."""


@contextlib.asynccontextmanager
async def embedded_engines(speed: float = 1.0, host: str = "127.0.0.1") -> AsyncIterator[list[EngineConfig]]:
    """Start the embedded simulated engines; yield their engine configurations; stop them on exit.

    Args:
        speed: the engines' clock speed (1.0 = real time, < 1 slower).
        host: loopback address to bind.
    """
    async with contextlib.AsyncExitStack() as stack:
        engines = []
        for name, flavor, dp_size in EMBEDDED_ENGINES:
            app = create_mock_engine_app(
                MockEngineConfig(flavor=flavor, dp_size=dp_size, model=EMBEDDED_MODEL, speed=speed)  # type: ignore[arg-type]
            )
            url = await stack.enter_async_context(serve_in_background(app, host))
            engines.append(
                EngineConfig(name=name, flavor=flavor, url=url, dp_size=dp_size, models=[EMBEDDED_MODEL])  # type: ignore[arg-type]
            )
        yield engines
