"""Replay a slice of a real trace through the gateway once per policy, on identical simulated engines.

Every policy gets fresh engine processes (``gateway mock-engine``, alternating SGLang and vLLM flavours), a fresh
gateway process (``gateway serve``) and the same requests at the same (rescaled) arrival times; the replay client
(``gateway bench``'s) runs in this process. The offered load is reported as a fraction of the simulated cluster's
capacity (see ``_harness.offered_load``).

    .venv/bin/python bench/compare_policies.py --minutes 5 --rate-scale 0.6 --speed 0.2

prints TTFT, TPOT and throughput per policy and writes ``bench/results/compare_policies.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _harness import (
    RESULTS,
    Processes,
    offered_load,
    results_table,
    start_engines,
    start_gateway,
    temporary_directory,
    write_slice,
)

from gateway.replay.client import run_bench
from gateway.replay.traces import load_trace, resolve_trace, window


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default="azure-conv", help="bundled trace name or file [azure-conv]")
    ap.add_argument("--start", type=float, default=0.0, help="slice start on the trace clock, seconds [0]")
    ap.add_argument("--minutes", type=float, default=5.0, help="slice length on the trace clock, minutes [5]")
    ap.add_argument("--rate-scale", type=float, default=0.6, help="divide inter-arrival times by this [0.6]")
    ap.add_argument("--speed", type=float, default=0.2, help="simulated engine clock speed [0.2]")
    ap.add_argument("--instances", type=int, default=2, help="engine instances [2]")
    ap.add_argument("--dp-size", type=int, default=4, help="DP ranks per instance [4]")
    ap.add_argument("--policies", default="sbs,round_robin", help="comma-separated policies [sbs,round_robin]")
    ap.add_argument("--model", default="deepseek-v3")
    ap.add_argument("--output", type=Path, default=RESULTS / "compare_policies.json")
    args = ap.parse_args()

    full = load_trace(resolve_trace(args.trace))
    trace = window(full, args.start, args.minutes * 60)
    # in engine time the replay's arrivals are rate_scale / speed times faster than the trace
    load, capacity = offered_load(trace, full, args.rate_scale / args.speed, args.instances, args.dp_size)
    print(
        f"{len(trace)} requests from {args.trace} [{args.start:.0f} s, +{args.minutes:g} min], "
        f"rate x{args.rate_scale}, {args.instances} instances x {args.dp_size} ranks at speed {args.speed}: "
        f"offered load {load:.0%} of capacity ({capacity * args.speed:,.0f} output tok/s at this speed)",
        file=sys.stderr,
    )
    flavors = ["sglang" if i % 2 == 0 else "vllm" for i in range(args.instances)]
    results = {}
    for policy in args.policies.split(","):
        print(f"\n== {policy}", file=sys.stderr)
        with Processes() as procs, temporary_directory() as tmp:
            engines = start_engines(procs, flavors, args.dp_size, args.speed, args.model)
            url = start_gateway(procs, policy, engines)
            results[policy] = run_bench(
                url,
                write_slice(trace, tmp),
                rate_scale=args.rate_scale,
                model=args.model,
                progress=sys.stderr.isatty(),
            )
    print("\n" + results_table(results))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "requests": len(trace),
        "offered_load": load,
        "capacity_output_tok_s": capacity * args.speed,
        "policies": results,
    }
    args.output.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
