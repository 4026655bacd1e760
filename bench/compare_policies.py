"""Replay a slice of a real trace through the gateway once per policy, on identical simulated engines.

Every policy gets fresh engine processes (``gateway mock-engine``, alternating SGLang and vLLM flavours), a fresh
gateway process (``gateway serve``) and the same requests at the same (rescaled) arrival times; the replay client
(``gateway bench``'s) runs in this process. The offered load is reported as a fraction of the simulated cluster's
capacity (see ``_harness.slice_load``).

    .venv/bin/python bench/compare_policies.py --minutes 5 --rate-scale 0.6 --speed 0.2

prints TTFT, TPOT and throughput per policy and writes ``bench/results/compare_policies.json``.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from _harness import RESULTS, add_slice_args, replay_through, results_table, slice_load, start_gateway, write_report

from gateway.workload.traces import load_trace, resolve_trace, window


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_slice_args(ap, minutes=5.0)
    ap.add_argument("--policies", default="sbs,round_robin", help="comma-separated policies [sbs,round_robin]")
    ap.add_argument("--output", type=Path, default=RESULTS / "compare_policies.json")
    args = ap.parse_args()

    full = load_trace(resolve_trace(args.trace))
    trace = window(full, args.start, args.minutes * 60)
    # in engine time the replay's arrivals are rate_scale / speed times faster than the trace
    capacity = slice_load(trace, args.rate_scale / args.speed, args.instances, args.dp_size)
    print(
        f"{len(trace)} requests from {args.trace} [{args.start:.0f} s, +{args.minutes:g} min], "
        f"rate x{args.rate_scale}, {args.instances} instances x {args.dp_size} ranks at speed {args.speed}: "
        f"offered load {capacity.load:.0%} of capacity ({capacity.capacity_rps * args.speed:,.2f} req/s at this speed)",
        file=sys.stderr,
    )
    flavors = ["sglang" if i % 2 == 0 else "vllm" for i in range(args.instances)]
    results = {}
    for policy in args.policies.split(","):
        print(f"\n== {policy}", file=sys.stderr)
        results[policy] = replay_through(partial(start_gateway, policy=policy), flavors, trace, args)
    print("\n" + results_table(results))
    write_report(
        args,
        requests=len(trace),
        offered_load=capacity.load,
        capacity_rps=capacity.capacity_rps * args.speed,
        capacity_output_tok_s=capacity.capacity_output_tok_s * args.speed,
        policies=results,
    )


if __name__ == "__main__":
    main()
