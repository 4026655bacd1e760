"""The embedded default: simulated engines started in-process, so ``gateway serve`` answers at once.

Two instances of 8 DP ranks, one SGLang-flavoured and one vLLM-flavoured, both serving ``deepseek-v3``, each on a
free loopback port. Or, with a P/D protocol (``gateway serve --pd sglang|vllm-nixl|vllm-mooncake``), a
disaggregated pair serving ``deepseek-v3``: a prefill engine of 4 DP ranks and a decode engine of 8 (the decode pool
the larger, as in DeepSeek-V3's deployment: 4 prefill nodes, 18 decode nodes), speaking that protocol.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Literal, get_args

from gateway.config import EngineConfig, EngineFlavor, KvConnector
from gateway.sim.cluster import LOOPBACK, SimulatedEngine, simulated_engines

EMBEDDED_MODEL = "deepseek-v3"
EMBEDDED_ENGINES = (
    SimulatedEngine("sim-sglang", "sglang", 8, EMBEDDED_MODEL),
    SimulatedEngine("sim-vllm", "vllm", 8, EMBEDDED_MODEL),
)
"""The embedded engines."""

PdProtocol = Literal["sglang", "vllm-nixl", "vllm-mooncake"]
"""A P/D protocol of the embedded pair: SGLang's bootstrap, or vLLM with its NixlConnector or MooncakeConnector."""

PD_PROTOCOLS: tuple[PdProtocol, ...] = get_args(PdProtocol)

EMBEDDED_PD_DP_SIZES = (4, 8)
"""DP ranks of the embedded P/D pair's prefill and decode engines."""

_KV_CONNECTORS: dict[PdProtocol, KvConnector] = {"vllm-nixl": "nixl", "vllm-mooncake": "mooncake"}


def embedded_pd_engines(protocol: PdProtocol) -> tuple[SimulatedEngine, SimulatedEngine]:
    """The embedded P/D pair speaking ``protocol``: ``sim-prefill`` and ``sim-decode``."""
    flavor: EngineFlavor = "sglang" if protocol == "sglang" else "vllm"
    connector = _KV_CONNECTORS.get(protocol)
    prefill_dp, decode_dp = EMBEDDED_PD_DP_SIZES
    return (
        SimulatedEngine("sim-prefill", flavor, prefill_dp, EMBEDDED_MODEL, "prefill", connector),
        SimulatedEngine("sim-decode", flavor, decode_dp, EMBEDDED_MODEL, "decode", connector),
    )


@contextlib.asynccontextmanager
async def embedded_engines(
    speed: float = 1.0, host: str = LOOPBACK, pd: PdProtocol | None = None
) -> AsyncIterator[list[EngineConfig]]:
    """Start the embedded simulated engines; yield their engine configurations; stop them on exit.

    Args:
        speed: the engines' clock speed (1.0 = real time, < 1 slower).
        host: loopback address to bind.
        pd: start the P/D pair speaking this protocol (:func:`embedded_pd_engines`) instead of the two mixed
            engines; its configurations carry ``role``, ``kv_connector`` and the prefill's ``bootstrap_port``.
    """
    specs = EMBEDDED_ENGINES if pd is None else embedded_pd_engines(pd)
    async with simulated_engines(specs, speed, host) as engines:
        yield engines
