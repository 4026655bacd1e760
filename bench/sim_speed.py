"""How fast the simulator runs: one ``gateway simulate`` run timed (wall and CPU seconds), with the load it puts on
the cluster, and optionally where the time went.

The run is the one ``gateway simulate --trace TRACE --instances N --dp-size D --policy POLICY`` makes (the same
configuration: ``SimConfig`` defaults with the preset applied, the default preset ``realistic-sglang``); its
summary is identical to that command's. ``--load`` rescales the trace to that fraction of the cluster's capacity
(:func:`gateway.sim.capacity.cluster_load`, the analytic load the evaluation uses), ``--duration`` keeps the first
seconds of the trace (before rescaling).

``--breakdown`` times the parts of the run in CPU seconds by wrapping their entry points (each part's own time, the
parts it calls excluded; the wrappers add about a microsecond per call, so that run is a little slower than the
plain one): the allocator's placement, the engine model's steps, scrapes (the engine's gauges and the load view taking
them), the load view's snapshots, the step clock's reading of token arrivals; the rest is the event loop, token
delivery, the window's polls and the load view's per-token accounting.

    .venv/bin/python bench/sim_speed.py --instances 4 --dp-size 144            # the hour of azure-conv, 4 x 144
    .venv/bin/python bench/sim_speed.py --instances 4 --dp-size 144 --duration 300 --breakdown --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from gateway.load.view import LoadView
from gateway.scheduling.allocation import WaterFill
from gateway.scheduling.phase import PhaseAware
from gateway.scheduling.scheduler import Scheduler
from gateway.sim.capacity import cluster_load
from gateway.sim.engine_model import EngineModel
from gateway.sim.presets import DEFAULT_PRESET, PRESET_NAMES, preset
from gateway.sim.simulate import SimConfig, Slo, _Sim, simulate
from gateway.workload.traces import load_trace, rescale, resolve_trace, window


@dataclass
class _Part:
    own_s: float = 0.0
    calls: int = 0


class Breakdown:
    """Exclusive time per named part: a part's time less that of the parts it calls."""

    def __init__(self) -> None:
        self.parts: dict[str, _Part] = {}
        self._stack: list[float] = []  # time spent in called parts, per open part

    def wrap(self, owner: Any, method: str, part: str) -> None:
        """Time ``owner.method`` (a class attribute) as ``part``."""
        original: Callable[..., Any] = getattr(owner, method)
        record = self.parts.setdefault(part, _Part())
        stack = self._stack
        clock = time.process_time

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            stack.append(0.0)
            start = clock()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = clock() - start
                inner = stack.pop()
                record.own_s += elapsed - inner
                record.calls += 1
                if stack:
                    stack[-1] += elapsed

        setattr(owner, method, timed)

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Wrap the parts for the duration of the block (class attributes, restored after)."""
        targets = [
            (PhaseAware, "place", "allocator placement"),
            (WaterFill, "place", "allocator placement"),
            (EngineModel, "step", "engine model steps"),
            (_Sim, "on_scrape", "scrapes"),
            (_Sim, "on_scrape_result", "scrapes"),
            (LoadView, "snapshot", "load view snapshots"),
            (Scheduler, "_track_step", "step clock (token arrivals)"),
        ]
        saved = [(owner, method, owner.__dict__[method]) for owner, method, _ in targets]
        for owner, method, part in targets:
            self.wrap(owner, method, part)
        try:
            yield
        finally:
            for owner, method, original in saved:
                setattr(owner, method, original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default="azure-conv")
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--dp-size", type=int, default=144)
    parser.add_argument("--policy", default="sbs")
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=PRESET_NAMES)
    parser.add_argument("--duration", type=float, default=None, help="seconds of the trace to keep [all]")
    parser.add_argument("--load", type=float, default=None, help="rescale to this fraction of the capacity")
    parser.add_argument("--breakdown", action="store_true", help="time the parts of the run (slightly slower)")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args()

    trace = window(load_trace(resolve_trace(args.trace)), 0.0, args.duration)
    chosen = preset(args.preset, args.dp_size)
    config = chosen.apply(SimConfig(policy=args.policy, instances=args.instances, dp_size=args.dp_size))
    capacity = cluster_load(trace, config.engine, args.instances, args.dp_size)
    scale = 1.0 if args.load is None else capacity.rate_scale_for(args.load)
    requests = rescale(trace, scale)
    ranks = args.instances * args.dp_size
    rps = capacity.request_rps * scale
    load = {
        "requests": len(requests),
        "rate_scale": scale,
        "request_rps": rps,
        "request_rps_per_rank": rps / ranks,
        "load": capacity.load * scale,
    }
    print(
        f"{args.trace}, {args.instances} x {args.dp_size} ranks, {args.preset}, {args.policy}: "
        f"{len(requests)} requests, "
        f"{rps:.2f} req/s ({rps / ranks:.4f} per rank), load {capacity.load * scale:.3f} of capacity"
        + ("" if scale == 1.0 else f" (rate x {scale:.2f})")
    )
    breakdown = Breakdown() if args.breakdown else None
    load_before = os.getloadavg()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if breakdown is not None:
        with breakdown.installed():
            result = simulate(requests, config)
    else:
        result = simulate(requests, config)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    load_after = os.getloadavg()
    summary = result.summary(Slo())
    print(
        f"wall {wall:.1f} s, CPU {cpu:.1f} s; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
        f"{summary['completed']} completed, TTFT p50 {summary['ttft_s']['p50']:.3f} s"
    )
    out: dict[str, Any] = {
        "args": vars(args),
        "load": load,
        "wall_s": wall,
        "cpu_s": cpu,
        "load_average": [load_before[0], load_after[0]],
        "summary": summary,
    }
    if breakdown is not None:
        parts = {name: {"own_s": p.own_s, "calls": p.calls} for name, p in breakdown.parts.items()}
        parts["rest (event loop, tokens, window, load view accounting)"] = {
            "own_s": cpu - sum(p.own_s for p in breakdown.parts.values()),
            "calls": 0,
        }
        out["breakdown"] = parts
        for name, p in sorted(parts.items(), key=lambda kv: -kv[1]["own_s"]):
            print(f"  {name:<56} {p['own_s']:7.1f} s CPU {p['own_s'] / cpu:6.1%}  {p['calls']:>9} calls")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
