"""Immediate-dispatch baselines, and their registry: each request goes to a DP rank the moment it arrives.

- :mod:`.base`: the :class:`~gateway.scheduling.baselines.base.ImmediatePolicy` protocol and shared helpers.
- :mod:`.indexed`: what a policy keeps to choose from the scheduler's live ranks in O(log ranks) (``choose_live``):
  per model, the candidates, their order by a load, a load's sum.
- :mod:`.policies`: the routers SBS is measured against (round robin, shortest queue, least tokens, power of two,
  random, vLLM's and SGLang's own DP balancing rules).
- :mod:`.least_waiting`: the fewest requests waiting for prefill.
- :mod:`.least_load`, :mod:`.cache_aware`, :mod:`.prefix_hash`: the SGLang Model Gateway's (smg) policies, per DP
  rank.
- :mod:`.vllm_dplb`: vLLM 0.34's internal DP load balancer.
- :mod:`.phase_aware`: ``sbs``'s phase-aware cost without the window, each request placed on arrival.

:data:`IMMEDIATE_POLICIES` below is the registry: adding a policy is one module here plus one entry (and its import)
in it; the configuration's ``policy`` names are read from it (``docs/adding-a-policy.md``). This package imports
nothing of the gateway but :mod:`gateway.types`, so :mod:`gateway.config` can build on it.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.scheduling.baselines.base import ImmediatePolicy, PolicyContext, StepPlacement
from gateway.scheduling.baselines.cache_aware import CacheAware
from gateway.scheduling.baselines.least_load import LeastLoad
from gateway.scheduling.baselines.least_waiting import LeastWaiting
from gateway.scheduling.baselines.phase_aware import PhaseAwareImmediate
from gateway.scheduling.baselines.policies import (
    LeastTokens,
    PowerOfTwo,
    RandomChoice,
    RoundRobin,
    SglangTotalTokens,
    ShortestQueue,
    VllmInternal,
)
from gateway.scheduling.baselines.prefix_hash import PrefixHash
from gateway.scheduling.baselines.vllm_dplb import VllmDplb

IMMEDIATE_POLICIES: dict[str, Callable[[PolicyContext], ImmediatePolicy]] = {
    "round_robin": lambda ctx: RoundRobin(),
    "shortest_queue": lambda ctx: ShortestQueue(),
    "least_tokens": lambda ctx: LeastTokens(),
    "sglang_total_tokens": lambda ctx: SglangTotalTokens(),
    "power_of_two": lambda ctx: PowerOfTwo(ctx.seed),
    "random": lambda ctx: RandomChoice(ctx.seed),
    "vllm_internal": lambda ctx: VllmInternal(),
    "least_waiting": lambda ctx: LeastWaiting(),
    "least_load": lambda ctx: LeastLoad(ctx.seed),
    "cache_aware": lambda ctx: CacheAware(ctx.seed),
    "prefix_hash": lambda ctx: PrefixHash(),
    "vllm_dplb": lambda ctx: VllmDplb(),
    "phase_aware": PhaseAwareImmediate,
}
"""Immediate-dispatch policy name (the ``policy`` setting) → factory taking the :class:`PolicyContext`: the seed
(``baselines.seed``; policies that draw no random numbers ignore it) and the scheduler's step placement (only
``phase_aware`` uses it)."""


def make_immediate_policy(name: str, *, seed: int = 0, steps: StepPlacement | None = None) -> ImmediatePolicy:
    """Build an immediate-dispatch policy by name, with the seed and the scheduler's step placement.

    Raises:
        ValueError: ``name`` is not in :data:`IMMEDIATE_POLICIES`, or it needs ``steps`` and got none.
    """
    factory = IMMEDIATE_POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown immediate-dispatch policy {name!r}")
    return factory(PolicyContext(seed, steps))
