"""Tenants in the simulator: the flood workload's tags and loads, and priority classes cutting the interactive
tenant's TTFT while a batch tenant floods, on a small cluster (seeded, deterministic)."""

from __future__ import annotations

import statistics

import pytest

from gateway.sim.capacity import needed_engine_time
from gateway.sim.presets import preset
from gateway.sim.simulate import SimConfig, simulate
from gateway.sim.tenants import BATCH, INTERACTIVE, flood_tenants, flood_workload, merge, tag
from gateway.workload.traces import TraceRequest, load_trace, resolve_trace, window


def test_tag_and_merge_keep_arrival_order() -> None:
    a = tag([TraceRequest(0.0, 10, 1), TraceRequest(2.0, 10, 1)], "a", 0)
    b = tag([TraceRequest(1.0, 10, 1), TraceRequest(2.0, 10, 1)], "b", 2)
    merged = merge(a, b)
    assert [(r.arrival_s, r.tenant, r.priority) for r in merged] == [
        (0.0, "a", 0),
        (1.0, "b", 2),
        (2.0, "a", 0),
        (2.0, "b", 2),
    ]


def test_the_flood_workload_offers_each_tenant_its_load() -> None:
    engine = preset("realistic-sglang", 4).engine
    conv = window(load_trace(resolve_trace("azure-conv")), 0.0, 600.0)
    code = load_trace(resolve_trace("azure-code"))
    flood = flood_workload(conv, code, engine, 1, 4, duration_s=30.0, capacity=0.5)
    assert flood.batch_load == pytest.approx(1.0)
    parts = {t: [r for r in flood.trace if r.tenant == t] for t in (INTERACTIVE, BATCH)}
    assert {r.priority for r in parts[INTERACTIVE]} == {0} and {r.priority for r in parts[BATCH]} == {2}
    assert all(r.arrival_s < 30.0 for r in flood.trace)
    # the engine time each slice needs over the 30 s: 0.6 x 0.5 and 1.0 x 0.5 of the 4 ranks' time
    for tenant, want in ((INTERACTIVE, 0.3), (BATCH, 0.5)):
        load = needed_engine_time(parts[tenant], engine, 4).total_s / (4 * 30.0)
        assert load == pytest.approx(want, rel=0.02)
    with pytest.raises(ValueError, match="too short"):
        flood_workload(conv[:5], code, engine, 1, 4, duration_s=30.0, capacity=0.5)


def test_priorities_cut_the_interactive_ttft_under_a_batch_flood() -> None:
    engine = preset("realistic-sglang", 4).engine
    conv = window(load_trace(resolve_trace("azure-conv")), 0.0, 600.0)
    code = load_trace(resolve_trace("azure-code"))
    trace = flood_workload(conv, code, engine, 1, 4, duration_s=40.0, capacity=0.5).trace
    ttft = {}
    for tenants in (None, flood_tenants()):
        config = preset("realistic-sglang", 4).apply(SimConfig(instances=1, dp_size=4, tenants=tenants))
        result = simulate(trace, config)
        assert all(r.done_s is not None for r in result.records)  # the batch backlog is served in the end
        ttft[tenants is not None] = statistics.fmean(
            rec.ttft_s for rec, req in zip(result.records, trace, strict=True) if req.tenant == INTERACTIVE
        )
    assert ttft[True] < 0.7 * ttft[False], ttft
