"""Tenants in the simulator: traces whose requests belong to tenants and priority classes, and the workload where
a batch tenant floods the cluster while an interactive tenant runs at a steady load (``bench/priorities.py``).

Each simulated request carries its tenant and class in :class:`~gateway.workload.traces.TraceRequest` (``tenant``,
``priority``); :class:`~gateway.sim.simulate.SimConfig` ``tenants`` tells the simulated gateway's scheduler the
classes and fairness rule, as the ``tenants`` section tells the live one. Pure: no I/O, no clock.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from gateway.config import TenantConfig, TenantsConfig
from gateway.sim.calibration import EngineModelConfig
from gateway.sim.capacity import cluster_load, needed_engine_time
from gateway.workload.traces import TraceRequest, rescale, window

INTERACTIVE, BATCH = "interactive", "batch"
"""The two tenants of :func:`flood_workload`, each in the class of its name."""


def tag(trace: Iterable[TraceRequest], tenant: str, priority: int) -> list[TraceRequest]:
    """``trace``'s requests charged to ``tenant`` in class ``priority``."""
    return [replace(r, tenant=tenant, priority=priority) for r in trace]


def merge(*traces: Sequence[TraceRequest]) -> list[TraceRequest]:
    """The requests of ``traces`` in one trace, by arrival (ties: the earlier trace's first)."""
    return list(heapq.merge(*traces, key=lambda r: r.arrival_s))


def at_load(
    trace: Sequence[TraceRequest], load: float, engine: EngineModelConfig, instances: int, dp: int
) -> list[TraceRequest]:
    """``trace`` rescaled so it puts ``load`` (fraction of the cluster's analytic capacity,
    :func:`gateway.sim.capacity.cluster_load`) on ``instances`` x ``dp`` ranks of ``engine``."""
    own = cluster_load(trace, engine, instances, dp).load
    return rescale(trace, load / own)


FIT_STEPS = 40
"""Bisection steps of :func:`over` on the rate scale (the load doubles at most per step of the bracket, so 40 steps
leave it within about 1e-12 of the target, or on a step of the trace's arrivals)."""


def over(
    source: Sequence[TraceRequest], load: float, duration_s: float, engine: EngineModelConfig, instances: int, dp: int
) -> list[TraceRequest]:
    """The first ``duration_s`` seconds of ``source`` rescaled so that they put ``load`` (fraction of the analytic
    capacity) on the cluster over those seconds: the engine time the slice's requests need
    (:func:`gateway.sim.capacity.needed_engine_time`) over ``instances * dp * duration_s``. The scale is found by
    bisection (that load only grows with it), on the slice itself: a trace's rate varies (Azure's first minutes are
    quieter than its hour), so a scale fitted on the whole source would miss the slice's load.

    Raises:
        ValueError: the source is too short to offer ``load`` over ``duration_s``.
    """
    ranks = instances * dp

    def offered(scale: float) -> float:
        part = window(rescale(source, scale), 0.0, duration_s)
        return needed_engine_time(part, engine, dp).total_s / (ranks * duration_s)

    lo, hi = 0.0, load / cluster_load(source, engine, instances, dp).load  # the whole source's scale
    while offered(hi) < load:
        if source[-1].arrival_s / hi < duration_s:  # all of it inside already: more speed adds nothing
            raise ValueError(f"the source trace is too short to offer {load:.2f} over {duration_s} s")
        lo, hi = hi, hi * 2
    for _ in range(FIT_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if offered(mid) < load else (lo, mid)
    return window(rescale(source, hi), 0.0, duration_s)


@dataclass(frozen=True)
class FloodWorkload:
    """An interactive tenant at a steady load and a batch tenant flooding the rest of the capacity.

    Attributes:
        trace: both tenants' requests by arrival, each tagged (:data:`INTERACTIVE` class 0, :data:`BATCH` class 2).
        interactive_load: the interactive tenant's load, fraction of the capacity.
        batch_load: the batch tenant's, fraction of the capacity.
        duration_s: the span of the arrivals, seconds.
    """

    trace: list[TraceRequest]
    interactive_load: float
    batch_load: float
    duration_s: float


def flood_workload(
    interactive_source: Sequence[TraceRequest],
    batch_source: Sequence[TraceRequest],
    engine: EngineModelConfig,
    instances: int,
    dp: int,
    *,
    duration_s: float,
    capacity: float,
    interactive_load: float = 0.6,
    flood_factor: float = 2.5,
) -> FloodWorkload:
    """Two tenants over ``duration_s`` of simulated time: the interactive tenant's requests are
    ``interactive_source``'s first ones at ``interactive_load`` of the capacity; the batch tenant's,
    ``batch_source``'s first ones at ``flood_factor`` times the rest of it, ``flood_factor * (1 -
    interactive_load)``. Loads are fractions of ``capacity``, itself a fraction of the cluster's analytic capacity
    (each slice fitted by :func:`over`): the sustainable share of it (``bench/results/evaluation.json``'s
    reference rate).

    Raises:
        ValueError: a source is empty, ``interactive_load`` is not in (0, 1), or a source is too short to fill
            ``duration_s`` at its rate.
    """
    if not 0 < interactive_load < 1:
        raise ValueError(f"interactive_load must be in (0, 1), got {interactive_load}")
    batch_load = flood_factor * (1 - interactive_load)
    parts = []
    for source, load in ((interactive_source, interactive_load), (batch_source, batch_load)):
        if not source:
            raise ValueError("a source trace is empty")
        parts.append(over(source, load * capacity, duration_s, engine, instances, dp))
    interactive = tag(parts[0], INTERACTIVE, 0)
    batch = tag(parts[1], BATCH, 2)
    return FloodWorkload(merge(interactive, batch), interactive_load, batch_load, duration_s)


def flood_tenants(fairness: str = "vtc") -> TenantsConfig:
    """The ``tenants`` section of :func:`flood_workload`'s gateway: the interactive tenant in ``interactive``, the
    batch tenant in ``batch`` (the default classes)."""
    return TenantsConfig(
        fairness=fairness,  # type: ignore[arg-type]
        tenants=[TenantConfig(name=INTERACTIVE, priority="interactive"), TenantConfig(name=BATCH, priority="batch")],
    )
