"""Check the analytic load (``gateway.sim.capacity``) against the simulator: is the backlog bounded below 1.0?

For each trace slice and load level, simulate policies in virtual time and report TTFT by fifth of the slice
(requests grouped by arrival) and the backlog when the last request arrives (requests arrived but without a
first token). A load the cluster keeps up with shows flat TTFT across the fifths and a small backlog; an
overload shows TTFT climbing fifth by fifth. ``--arrivals poisson`` keeps each slice's requests and mean rate but
draws the arrival times from a Poisson process (seed 0), which separates the capacity from the trace's bursts.

    .venv/bin/python bench/capacity_check.py --jobs 2     # writes bench/results/capacity_check.{json,md}
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from _harness import RESULTS
from _simbench import write_outputs

from gateway.sim.capacity import cluster_load
from gateway.sim.simulate import SimConfig, simulate
from gateway.workload.traces import TraceRequest, load_trace, rescale, resolve_trace, window

FIFTHS = 5


def poisson(trace: list[TraceRequest], seed: int = 0) -> list[TraceRequest]:
    """The same requests in the same order at the same mean rate, arriving as a Poisson process."""
    rng = random.Random(seed)
    rate = (len(trace) - 1) / (trace[-1].arrival_s - trace[0].arrival_s)
    t, out = 0.0, []
    for r in trace:
        out.append(replace(r, arrival_s=t))
        t += rng.expovariate(rate)
    return out


def check(
    name: str, minutes: float, load: float, policy: str, instances: int, dp_size: int, arrivals: str
) -> dict[str, Any]:
    """One simulation: TTFT mean per fifth of the slice (seconds) and the backlog at the last arrival."""
    trace = window(load_trace(resolve_trace(name)), 0.0, minutes * 60)
    if arrivals == "poisson":
        trace = poisson(trace)
    config = SimConfig(policy=policy, instances=instances, dp_size=dp_size)
    capacity = cluster_load(trace, config.engine, instances, dp_size)
    result = simulate(rescale(trace, capacity.rate_scale_for(load)), config)
    records = result.records
    last = records[-1].arrival_s
    backlog = sum(1 for r in records if r.first_token_s is None or r.first_token_s > last)
    size = len(records) / FIFTHS
    fifths = [
        statistics.fmean(r.ttft_s for r in records[round(i * size) : round((i + 1) * size)]) for i in range(FIFTHS)
    ]
    return {"trace": name, "load": load, "policy": policy, "ttft_mean_by_fifth_s": fifths, "backlog_at_end": backlog}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", default="azure-conv,azure-code,mooncake-conv")
    ap.add_argument("--loads", default="0.8,0.95,1.2")
    ap.add_argument("--policies", default="sbs,round_robin")
    ap.add_argument("--minutes", type=float, default=10.0, help="slice of each trace, minutes [10]")
    ap.add_argument("--instances", type=int, default=2, help="engine instances [2]")
    ap.add_argument("--dp-size", type=int, default=8, help="DP ranks per instance [8]")
    ap.add_argument("--arrivals", choices=("trace", "poisson"), default="trace", help="arrival times [trace]")
    ap.add_argument("--jobs", type=int, default=1, help="simulations run in parallel processes [1]")
    ap.add_argument("--output", type=Path, default=RESULTS / "capacity_check")
    args = ap.parse_args()
    started = time.perf_counter()
    jobs = [
        (name, args.minutes, float(load), policy, args.instances, args.dp_size, args.arrivals)
        for name in args.traces.split(",")
        for load in args.loads.split(",")
        for policy in args.policies.split(",")
    ]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(check, *zip(*jobs, strict=True)))
    md = [
        "# Analytic load against the simulator",
        "",
        f"Made by `{' '.join(['python bench/capacity_check.py', *sys.argv[1:]])}` ({args.arrivals} arrivals, "
        f"{args.instances} x {args.dp_size} ranks, {args.minutes:g}-minute slices). TTFT mean (s) of each "
        "fifth of the slice's requests by arrival; backlog: requests without a first token when the last one "
        "arrives.",
        "",
        "| trace | load | policy | " + " | ".join(f"TTFT {i + 1}/5" for i in range(FIFTHS)) + " | backlog |",
        "|---|---:|---|" + "---:|" * (FIFTHS + 1),
    ]
    for row in rows:
        cells = " | ".join(f"{t:.2f}" for t in row["ttft_mean_by_fifth_s"])
        md.append(f"| {row['trace']} | {row['load']:.0%} | {row['policy']} | {cells} | {row['backlog_at_end']} |")
        print(md[-1], file=sys.stderr)
    write_outputs(args.output, {"config": vars(args) | {"output": str(args.output)}, "runs": rows}, md, started)


if __name__ == "__main__":
    main()
