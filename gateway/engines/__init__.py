"""Everything the gateway knows about the engines it routes to, one module per flavour.

- :mod:`.client`: ``EngineClient``, the one HTTP seam towards engines (aiohttp), the same for every flavour.
- :mod:`.base`: ``EngineAdapter`` (pin a DP rank, parse ``/metrics`` into per-rank load, normalize errors) and
  the pure metrics parser it builds on.
- :mod:`.sglang`, :mod:`.vllm`: the two flavours; :data:`ADAPTERS` maps a configured ``flavor`` to its adapter,
  and an :class:`Engine` pairs one configured engine with its adapter.

Adding a flavour: ``docs/adding-an-engine.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import EngineConfig
from gateway.engines.base import EngineAdapter, MetricsParseError
from gateway.engines.sglang import SglangAdapter
from gateway.engines.vllm import VllmAdapter

ADAPTERS: dict[str, type[EngineAdapter]] = {"sglang": SglangAdapter, "vllm": VllmAdapter}


def adapter_for(flavor: str) -> EngineAdapter:
    """The adapter of an engine flavour. Raises ``KeyError`` for an unknown flavour."""
    return ADAPTERS[flavor]()


@dataclass(frozen=True, slots=True, eq=False)
class Engine:
    """One configured engine: its settings and the adapter of its flavour.

    Attributes:
        config: the engine's settings (name, URL, DP size, models).
        adapter: how to pin its ranks, read its metrics and read its errors.
    """

    config: EngineConfig
    adapter: EngineAdapter

    @classmethod
    def from_config(cls, config: EngineConfig) -> Engine:
        """The engine of ``config`` with its flavour's adapter."""
        return cls(config, adapter_for(config.flavor))

    @property
    def name(self) -> str:
        """The engine's name."""
        return self.config.name

    def url(self, path: str) -> str:
        """The full URL of ``path`` (``/v1/completions``, ``/metrics``...) on this engine."""
        return self.config.url + path


__all__ = ["ADAPTERS", "Engine", "EngineAdapter", "MetricsParseError", "adapter_for"]
