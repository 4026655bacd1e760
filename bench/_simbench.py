"""Shared pieces of the virtual-time studies (``ablation.py``, ``sensitivity.py``): one simulated run of a policy
with settings overridden, the load level of a trace slice, and the table row both print.

Imported by the scripts beside it (``python bench/<script>.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from _harness import slice_load
from pydantic import TypeAdapter

from gateway.config import AllocatorConfig, DecodeConfig, WindowConfig
from gateway.sim.compare import timed_summary
from gateway.sim.simulate import SimConfig, Slo, derived_slo
from gateway.workload.traces import TraceRequest, load_trace, rescale, resolve_trace, window


@dataclass(frozen=True)
class Variant:
    """One configuration to simulate: a policy, scheduling settings changed from the defaults (nested as in the
    gateway's YAML: ``{"window": {...}, "allocator": {...}, "decode": None}``, see :func:`scheduling_settings`),
    and simulator settings changed from ``SimConfig``'s (``instances``, ``dp_size``, ``scrape_interval_s``, ...)."""

    name: str
    policy: str = "sbs"
    settings: dict[str, Any] = field(default_factory=dict)
    sim: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Workload:
    """A trace slice at a rate scale, with the SLO it is judged against."""

    trace: list[TraceRequest]
    scale: float
    slo: Slo


def workload(name: str, minutes: float | None, load: float, instances: int, dp_size: int, slo_scale: float) -> Workload:
    """The first ``minutes`` of trace ``name`` (all of it if ``None``), rescaled to ``load`` (fraction of the
    capacity of ``instances`` x ``dp_size`` ranks, as in ``_harness.slice_load``), with its derived SLO."""
    trace = window(load_trace(resolve_trace(name)), 0.0, None if minutes is None else minutes * 60)
    scale = slice_load(trace, 1.0, instances, dp_size).rate_scale_for(load)
    return Workload(trace, scale, derived_slo(trace, SimConfig().engine, slo_scale))


def scheduling_settings(overrides: dict[str, Any]) -> dict[str, Any]:
    """The ``window``, ``allocator`` and ``decode`` sections of the simulator's defaults with ``overrides`` (nested
    as in the gateway's YAML) merged in, validated: an allocator of another ``kind`` starts from that kind's
    defaults, ``"decode": None`` switches the decode-aware choice off.

    Raises:
        ValueError: a section or setting that does not exist (pydantic's validation error).
    """
    unknown = set(overrides) - {"window", "allocator", "decode"}
    if unknown:
        raise ValueError(f"not a scheduling section: {sorted(unknown)}")
    base = SimConfig()
    allocator = overrides.get("allocator", {})
    same_kind = allocator.get("kind", base.allocator.kind) == base.allocator.kind
    decode = overrides.get("decode", {})
    return {
        "window": WindowConfig.model_validate({**base.window.model_dump(), **overrides.get("window", {})}),
        "allocator": TypeAdapter(AllocatorConfig).validate_python(
            {**(base.allocator.model_dump() if same_kind else {}), **allocator}
        ),
        "decode": None if decode is None else DecodeConfig.model_validate({**DecodeConfig().model_dump(), **decode}),
    }


def sim_config(variant: Variant) -> SimConfig:
    """The simulator configuration of ``variant``: the defaults with its policy, scheduling and simulator
    settings."""
    return replace(
        SimConfig(),
        policy=variant.policy,
        **scheduling_settings(variant.settings),
        **variant.sim,
    )


def run_variant(variant: Variant, work: Workload) -> dict[str, Any]:
    """Simulate ``variant`` on ``work``; the summary with ``wall_s`` (seconds this run took) added."""
    return timed_summary(rescale(work.trace, work.scale), sim_config(variant), work.slo)


def ms(x: float | None) -> str:
    return "–" if x is None else f"{x * 1000:,.0f}"


HEADER = [
    "| TTFT mean | p50 | p99 (ms) | TPOT mean | p99 (ms) | output tok/s | goodput (req/s) | SLO met |",
    "|---:|---:|---:|---:|---:|---:|---:|---:|",
]


def row(s: dict[str, Any]) -> str:
    """The figures of one summary as table cells (matching :data:`HEADER`)."""
    t, p = s["ttft_s"], s["tpot_s"]
    return (
        f"| {ms(t['mean'])} | {ms(t['p50'])} | {ms(t['p99'])} | {ms(p['mean'])} | {ms(p['p99'])} | "
        f"{s['output_throughput_tok_s']:,.0f} | {s['goodput_rps']:.2f} | {s['slo_attainment']:.0%} |"
    )


def add_common_args(ap: argparse.ArgumentParser, *, minutes: float | None) -> None:
    """Options both studies share."""
    ap.add_argument("--load", type=float, default=0.8, help="offered load, fraction of capacity [0.8]")
    ap.add_argument("--minutes", type=float, default=minutes, help=f"slice of each trace, minutes [{minutes or 'all'}]")
    ap.add_argument("--slo-scale", type=float, default=3.0, help="scale of the derived SLO [3]")
    ap.add_argument("--jobs", type=int, default=1, help="simulations run in parallel processes [1]")


def write_outputs(output: Path, report: dict[str, Any], md: list[str], started: float, note: str = "") -> None:
    """Stamp ``report`` with the elapsed time since ``started`` and write it as ``output``.json and ``md`` as
    ``output``.md."""
    elapsed = time.perf_counter() - started
    report["elapsed_s"] = elapsed
    md += ["", f"Generated in {elapsed:.0f} s{note}."]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(report, indent=2))
    output.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {output}.md ({elapsed:.0f} s)", file=sys.stderr)
