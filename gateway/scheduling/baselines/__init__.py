"""Immediate-dispatch baselines, and their registry: each request goes to a DP rank the moment it arrives.

- :mod:`.base`: the :class:`~gateway.scheduling.baselines.base.ImmediatePolicy` protocol and shared helpers.
- :mod:`.policies`: the routers SBS is measured against (round robin, shortest queue, least tokens, power of two,
  random, vLLM's and SGLang's own DP balancing rules).
- :mod:`.least_waiting`: the fewest requests waiting for prefill.
- :mod:`.least_load`, :mod:`.cache_aware`, :mod:`.prefix_hash`: the SGLang Model Gateway's (smg) policies, per DP
  rank.
- :mod:`.vllm_dplb`: vLLM 0.34's internal DP load balancer.

:data:`IMMEDIATE_POLICIES` below is the registry: adding a policy is one module here plus one entry (and its import)
in it; the configuration's ``policy`` names are read from it (``docs/adding-a-policy.md``). This package imports
nothing of the gateway but :mod:`gateway.types`, so :mod:`gateway.config` can build on it.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.scheduling.baselines.base import ImmediatePolicy
from gateway.scheduling.baselines.cache_aware import CacheAware
from gateway.scheduling.baselines.least_load import LeastLoad
from gateway.scheduling.baselines.least_waiting import LeastWaiting
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

IMMEDIATE_POLICIES: dict[str, Callable[[int], ImmediatePolicy]] = {
    "round_robin": lambda seed: RoundRobin(),
    "shortest_queue": lambda seed: ShortestQueue(),
    "least_tokens": lambda seed: LeastTokens(),
    "sglang_total_tokens": lambda seed: SglangTotalTokens(),
    "power_of_two": PowerOfTwo,
    "random": RandomChoice,
    "vllm_internal": lambda seed: VllmInternal(),
    "least_waiting": lambda seed: LeastWaiting(),
    "least_load": lambda seed: LeastLoad(),
    "cache_aware": CacheAware,
    "prefix_hash": lambda seed: PrefixHash(),
    "vllm_dplb": lambda seed: VllmDplb(),
}
"""Immediate-dispatch policy name (the ``policy`` setting) → factory taking the seed (``baselines.seed``; policies
that draw no random numbers ignore it)."""


def make_immediate_policy(name: str, *, seed: int = 0) -> ImmediatePolicy:
    """Build an immediate-dispatch policy by name.

    Raises:
        ValueError: ``name`` is not in :data:`IMMEDIATE_POLICIES`.
    """
    factory = IMMEDIATE_POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown immediate-dispatch policy {name!r}")
    return factory(seed)
