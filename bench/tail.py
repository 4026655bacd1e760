"""Where the TTFT tail comes from: for the slowest 1% of requests (by TTFT) against all, the time each spent
waiting in the gateway's window, queued inside the engine, and in its own prefill, in virtual time.

For each trace, ``sbs`` and the immediate-dispatch baselines run on the report's slice (the first 10 minutes,
2 instances x 8 ranks) at one load (default 80% of the analytic capacity, ``gateway.sim.capacity``). A request's
TTFT splits into

- **window**: arrival to the moment it is sent to its rank (0 for immediate dispatch);
- **own prefill**: its unloaded TTFT (``gateway.sim.simulate.unloaded_ttft_s``: its prompt alone on an idle
  rank, in full chunks, plus one decode step);
- **engine queue**: the rest, time at the engine beyond its own prefill (waiting for a budget behind other
  prompts, and slower lockstep steps because other ranks carry more work).

    .venv/bin/python bench/tail.py [--load 0.8] [--traces azure-conv,azure-code,mooncake-conv] [--jobs 2]

prints one table per trace and writes ``bench/results/tail.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from _harness import RESULTS
from _simbench import Workload, add_common_args, ms, workload, write_outputs

from gateway.sim.simulate import SimConfig, simulate
from gateway.workload.traces import rescale

POLICIES = ("sbs", "round_robin", "least_tokens", "sglang_total_tokens", "vllm_internal")
TAIL = 0.01


def split(policy: str, work: Workload) -> dict[str, Any]:
    """Simulate ``policy`` on ``work``; the mean TTFT parts over all requests and over the slowest ``TAIL``."""
    trace = rescale(work.trace, work.scale)
    records = simulate(trace, replace(SimConfig(), policy=policy)).records
    rows = []
    for request, record in zip(trace, records, strict=True):
        assert record.sent_s is not None and record.first_token_s is not None
        window_s = record.sent_s - record.arrival_s
        own = record.unloaded_ttft_s
        rows.append((record.ttft_s, window_s, record.ttft_s - window_s - own, own, request.prompt_tokens))
    rows.sort(key=lambda r: r[0])
    tail = rows[-max(1, round(len(rows) * TAIL)) :]

    def means(group: Sequence[tuple[float, ...]]) -> dict[str, float]:
        names = ("ttft_s", "window_s", "engine_queue_s", "own_prefill_s", "prompt_tokens")
        return {name: statistics.fmean(r[i] for r in group) for i, name in enumerate(names)}

    return {"policy": policy, "all": means(rows), "tail": means(tail), "tail_size": len(tail)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--traces", default="azure-conv,azure-code,mooncake-conv")
    add_common_args(ap, minutes=10.0)
    ap.add_argument("--output", type=Path, default=RESULTS / "tail")
    args = ap.parse_args()
    started = time.perf_counter()
    command = "python bench/tail.py " + " ".join(sys.argv[1:])
    md = [
        "# Where the TTFT tail comes from (virtual time)",
        "",
        f"Made by `{command.strip()}`: the first {args.minutes:g} minutes of each trace at {args.load:.0%} of the "
        "analytic capacity of 2 x 8 ranks. Mean TTFT and its parts over all requests, then over the slowest "
        f"{TAIL:.0%} by TTFT (see the module docstring of `bench/tail.py`). Times in ms.",
    ]
    report: dict[str, Any] = {"command": command, "load": args.load, "traces": {}}
    with ProcessPoolExecutor(args.jobs) as pool:
        for trace in args.traces.split(","):
            work = workload(trace, args.minutes, args.load, 2, 8, args.slo_scale)
            results = list(pool.map(split, POLICIES, [work] * len(POLICIES)))
            report["traces"][trace] = {"rate_scale": work.scale, "requests": len(work.trace), "runs": results}
            md += [
                "",
                f"## {trace}",
                "",
                f"{len(work.trace)} requests, rate x{work.scale:.2f}; the slowest 1% are "
                f"{results[0]['tail_size']} requests.",
                "",
                "| policy | requests | TTFT | window | engine queue | own prefill | prompt tokens |",
                "|---|---|---:|---:|---:|---:|---:|",
            ]
            for r in results:
                for group in ("all", "tail"):
                    g = r[group]
                    md.append(
                        f"| {r['policy']} | {'slowest 1%' if group == 'tail' else 'all'} | {ms(g['ttft_s'])} | "
                        f"{ms(g['window_s'])} | {ms(g['engine_queue_s'])} | {ms(g['own_prefill_s'])} | "
                        f"{g['prompt_tokens']:,.0f} |"
                    )
            print("\n".join(md[-2 * len(POLICIES) - 2 :]), file=sys.stderr)
    write_outputs(args.output, report, md, started)


if __name__ == "__main__":
    main()
