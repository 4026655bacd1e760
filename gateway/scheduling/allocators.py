"""The allocators ``sbs`` can place a window's batch with, by ``allocator.kind``: adding one is one module, its
settings class in :data:`gateway.config.AllocatorConfig` and one entry here (``docs/adding-a-policy.md``).

Each is built once, from its own settings section, the ``decode`` section (``None`` when off), the step clock and
the prefix index (``None`` when off); a test checks that the configuration's kinds and :data:`ALLOCATORS` agree. The
immediate-dispatch policies have their own registry, :data:`gateway.scheduling.baselines.IMMEDIATE_POLICIES`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from gateway.config import DecodeConfig
from gateway.scheduling.allocation import WaterFill
from gateway.scheduling.phase import PhaseAware
from gateway.scheduling.prefix_index import PrefixIndex
from gateway.scheduling.step_clock import StepClock
from gateway.scheduling.types import Allocation
from gateway.types import PendingRequest, RankLoad


class Allocator(Protocol):
    """Places a window's batch on DP ranks."""

    def place(self, batch: Sequence[PendingRequest], ranks: Sequence[RankLoad], now: float) -> Allocation:
        """Assign what fits, defer what does not, report what no usable rank serves.

        Args:
            batch: the window's requests.
            ranks: a snapshot of every DP rank's load.
            now: current time (seconds).
        """
        ...


ALLOCATORS: dict[str, Callable[[Any, DecodeConfig | None, StepClock, PrefixIndex | None], Allocator]] = {
    "water_fill": lambda settings, decode, clock, prefix: WaterFill(settings, decode),
    "phase_aware": PhaseAware,
}
"""Allocator kind → factory taking its ``allocator`` section, the ``decode`` section (``None`` when off), the
step clock and the prefix index (``None`` when off)."""
