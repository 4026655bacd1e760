"""The policies and allocators the configuration can name: adding one is one module and one line here.

- :data:`IMMEDIATE_POLICIES`: the immediate-dispatch baselines by ``policy`` name, each built from its seed (the
  ``baselines.seed`` setting; policies that draw no random numbers ignore it). ``sbs`` is not here: it is the
  staggered window with one of the allocators below.
- :data:`ALLOCATORS`: how ``sbs`` places a window's batch, by ``allocator.kind``, each built from its own settings
  section, the ``decode`` section and the step clock.

The configuration's policy names come from :data:`IMMEDIATE_POLICIES`; its allocator kinds are the variants of
:data:`gateway.config.AllocatorConfig`, and a test checks that they and :data:`ALLOCATORS` agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from gateway.scheduling.allocation import WaterFill
from gateway.scheduling.baselines import (
    ImmediatePolicy,
    LeastTokens,
    PowerOfTwo,
    RandomChoice,
    RoundRobin,
    SglangTotalTokens,
    ShortestQueue,
    VllmInternal,
)
from gateway.scheduling.least_waiting import LeastWaiting
from gateway.scheduling.phase import PhaseAware
from gateway.scheduling.step_clock import StepClock
from gateway.scheduling.types import Allocation
from gateway.types import PendingRequest, RankLoad

if TYPE_CHECKING:
    from gateway.config import DecodeConfig


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


IMMEDIATE_POLICIES: dict[str, Callable[[int], ImmediatePolicy]] = {
    "round_robin": lambda seed: RoundRobin(),
    "shortest_queue": lambda seed: ShortestQueue(),
    "least_tokens": lambda seed: LeastTokens(),
    "sglang_total_tokens": lambda seed: SglangTotalTokens(),
    "power_of_two": PowerOfTwo,
    "random": RandomChoice,
    "vllm_internal": lambda seed: VllmInternal(),
    "least_waiting": lambda seed: LeastWaiting(),
}
"""Immediate-dispatch policy name → factory taking the seed."""

ALLOCATORS: dict[str, Callable[[Any, DecodeConfig | None, StepClock], Allocator]] = {
    "water_fill": lambda settings, decode, clock: WaterFill(settings, decode),
    "phase_aware": PhaseAware,
}
"""Allocator kind → factory taking its ``allocator`` section, the ``decode`` section (``None`` when off) and the
step clock."""


def make_immediate_policy(name: str, *, seed: int = 0) -> ImmediatePolicy:
    """Build an immediate-dispatch policy by name.

    Raises:
        ValueError: ``name`` is not in :data:`IMMEDIATE_POLICIES`.
    """
    factory = IMMEDIATE_POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown immediate-dispatch policy {name!r}")
    return factory(seed)
