"""Engine adapters, one module per flavour."""

from gateway.engines.base import EngineAdapter, MetricsParseError
from gateway.engines.sglang import SglangAdapter
from gateway.engines.vllm import VllmAdapter

ADAPTERS: dict[str, type[EngineAdapter]] = {"sglang": SglangAdapter, "vllm": VllmAdapter}


def adapter_for(flavor: str) -> EngineAdapter:
    """The adapter of an engine flavour. Raises ``KeyError`` for an unknown flavour."""
    return ADAPTERS[flavor]()


__all__ = ["ADAPTERS", "EngineAdapter", "MetricsParseError", "adapter_for"]
