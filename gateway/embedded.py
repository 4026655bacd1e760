"""The embedded default: simulated engines started in-process, so ``gateway serve`` answers at once.

Two instances of 8 DP ranks, one SGLang-flavoured and one vLLM-flavoured, both serving ``deepseek-v3``, each on a
free loopback port.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from gateway.config import EngineConfig
from gateway.sim.cluster import LOOPBACK, SimulatedEngine, simulated_engines

EMBEDDED_MODEL = "deepseek-v3"
EMBEDDED_ENGINES = (
    SimulatedEngine("sim-sglang", "sglang", 8, EMBEDDED_MODEL),
    SimulatedEngine("sim-vllm", "vllm", 8, EMBEDDED_MODEL),
)
"""The embedded engines."""


@contextlib.asynccontextmanager
async def embedded_engines(speed: float = 1.0, host: str = LOOPBACK) -> AsyncIterator[list[EngineConfig]]:
    """Start the embedded simulated engines; yield their engine configurations; stop them on exit.

    Args:
        speed: the engines' clock speed (1.0 = real time, < 1 slower).
        host: loopback address to bind.
    """
    async with simulated_engines(EMBEDDED_ENGINES, speed, host) as engines:
        yield engines
