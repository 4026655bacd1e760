"""Everything the gateway knows about the engines it routes to, one module per flavour.

- :mod:`.client`: ``EngineClient``, the one HTTP seam towards engines (aiohttp), the same for every flavour.
- :mod:`.base`: ``EngineAdapter`` (pin a DP rank, parse ``/metrics`` into per-rank load, normalize errors) and
  the pure metrics parser it builds on.
- :mod:`.sglang`, :mod:`.vllm`: the two flavours; :data:`ADAPTERS` maps a configured ``flavor`` to its adapter.

Adding a flavour: ``docs/adding-an-engine.md``.
"""

from gateway.engines.base import EngineAdapter, MetricsParseError, RankMetrics
from gateway.engines.sglang import SglangAdapter
from gateway.engines.vllm import VllmAdapter

ADAPTERS: dict[str, type[EngineAdapter]] = {"sglang": SglangAdapter, "vllm": VllmAdapter}


def adapter_for(flavor: str) -> EngineAdapter:
    """The adapter of an engine flavour. Raises ``KeyError`` for an unknown flavour."""
    return ADAPTERS[flavor]()


__all__ = ["ADAPTERS", "EngineAdapter", "MetricsParseError", "RankMetrics", "adapter_for"]
