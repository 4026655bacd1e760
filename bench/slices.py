"""The claim over several slices of each trace: how much of sbs's gain (or shortfall) is the slice, not the policy.

``bench/report.py`` and ``bench/claim.py`` judge each trace on its first 10 minutes, whose TTFT p99 rests on the
slowest 1% of a few thousand requests (29 on Azure conv). Here every policy runs, in virtual time, on
``--slices`` consecutive slices of ``--minutes`` each (2 instances x 8 ranks), each slice rescaled to ``--load``
of its own analytic capacity (``gateway.sim.capacity``), and sbs is set against the best baseline per figure:

- **per slice**: sbs's TTFT mean and p99 against the lowest of any baseline on that slice, and the spread of
  those deltas over the slices (their mean, smallest and largest);
- **arrival-order bound**: ``claim.py``'s fluid FCFS bound with every rank's budget taking the time of one full
  chunk of a fresh prompt (``alltoall_s + prefill_chunk_s(budget, 0)``: 1.25 s for 8k tokens, attention
  included, against 0.90 s for the linear term alone): where a burst's backlog sets the tail, it is close to what
  any policy that keeps arrival order gets (not a strict bound: short prompts' chunks cost less attention);
- **pooled**: the requests of all slices together, per policy (five times the tail of one slice), with a 95%
  paired bootstrap interval of sbs's delta against that best baseline: the requests are resampled with
  replacement, the same draw for both policies, ``--resamples`` times. Requests of one burst are not
  independent, so the interval is narrower than the truth; the per-slice spread is the coarser check.

    .venv/bin/python bench/slices.py --jobs 2     # writes bench/results/slices.{json,md}
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, get_args

from _harness import RESULTS, slice_load
from _simbench import Variant, add_common_args, sim_config, write_outputs
from claim import fcfs_bound, mean_and_p99, p99

from gateway.config import PolicyName
from gateway.sim.simulate import SimConfig, simulate
from gateway.workload.traces import TraceRequest, load_trace, rescale, resolve_trace, window

TRACES = ("azure-conv", "azure-code", "mooncake-conv")
TARGET = 0.7
"""sbs's TTFT mean and p99 at most 70% of the best baseline's (issue 3's target, docs/design.md §6.4)."""


def run(policy: str, trace: list[TraceRequest], scale: float, settings: dict[str, Any]) -> tuple[list[float], float]:
    """TTFT of every request of ``trace`` at ``scale`` under ``policy`` with the scheduling ``settings`` changed from
    the defaults (nested as in the gateway's YAML, :func:`_simbench.scheduling_settings`) (seconds, in trace
    order), and the mean TPOT (seconds) over the requests of 2+ output tokens."""
    records = simulate(rescale(trace, scale), sim_config(Variant(policy, policy, settings))).records
    return [r.ttft_s for r in records], statistics.fmean(r.tpot_s for r in records if r.output_tokens > 1)


def best_baseline(per_policy: dict[str, dict[str, float]], figure: str) -> tuple[str, float]:
    name = min((p for p in per_policy if p != "sbs"), key=lambda p: per_policy[p][figure])
    return name, per_policy[name][figure]


def paired_bootstrap(
    sbs: list[float], other: list[float], figure: str, resamples: int, seed: int
) -> tuple[float, float]:
    """95% interval of ``figure(sbs) / figure(other) - 1`` over paired resamples of the requests."""
    rng = random.Random(seed)
    n = len(sbs)
    stat = statistics.fmean if figure == "mean" else p99
    deltas = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        deltas.append(stat([sbs[i] for i in idx]) / stat([other[i] for i in idx]) - 1)
    deltas.sort()
    return deltas[int(0.025 * (resamples - 1))], deltas[int(0.975 * (resamples - 1))]


def pct(x: float) -> str:
    return f"{x:+.0%}"


Slice = tuple[float, list[TraceRequest], float]
"""A slice: its start on the trace clock (minutes), its requests, the rate scale that puts it at the load asked."""


def trace_section(
    name: str,
    slices: list[Slice],
    per_slice: list[dict[str, list[float]]],
    tpot: dict[str, float],
    args: argparse.Namespace,
) -> tuple[list[str], dict[str, Any]]:
    """The Markdown section and the JSON entry of one trace, from each slice's TTFTs per policy and each policy's
    TPOT mean over the slices."""
    md = [
        "",
        f"## {name}",
        "",
        "| slice (min) | requests | rate | figure | sbs (ms) | best baseline (ms) | delta | arrival-order bound (ms) |",
        "|---|---:|---:|---|---:|---|---:|---:|",
    ]
    entry: dict[str, Any] = {"slices": [], "pooled": {}}
    base = SimConfig()
    engine, ranks = base.engine, base.instances * base.dp_size
    budget = engine.max_prefill_tokens_per_step
    deltas: dict[str, list[float]] = {"mean": [], "p99": []}
    for (start, trace, scale), runs in zip(slices, per_slice, strict=True):
        figs = {p: mean_and_p99(t) for p, t in runs.items()}
        bound = fcfs_bound(rescale(trace, scale), engine, ranks, engine.alltoall_s + engine.prefill_chunk_s(budget, 0))
        row: dict[str, Any] = {
            "start_min": start,
            "requests": len(trace),
            "rate_scale": scale,
            "figures": figs,
            "arrival_order_bound": bound,
        }
        for figure in ("mean", "p99"):
            other, value = best_baseline(figs, figure)
            delta = figs["sbs"][figure] / value - 1
            deltas[figure].append(delta)
            row[f"{figure}_delta"] = delta
            md.append(
                f"| {start:g}–{start + args.minutes:g} | {len(trace):,} | x{scale:.2f} | TTFT {figure} | "
                f"{figs['sbs'][figure] * 1000:,.0f} | {other} {value * 1000:,.0f} | {pct(delta)} | "
                f"{bound[figure] * 1000:,.0f} |"
            )
        entry["slices"].append(row)
    pooled = {p: [t for runs in per_slice for t in runs[p]] for p in per_slice[0]}
    pooled_figs = entry["pooled_figures"] = {p: mean_and_p99(t) for p, t in pooled.items()}
    md += [
        "",
        "| over the slices | figure | sbs (ms) | best baseline (ms) | delta | 95% interval | "
        "per-slice deltas: mean [min, max] | slices on target |",
        "|---|---|---:|---|---:|---|---|---:|",
    ]
    for figure in ("mean", "p99"):
        other, value = best_baseline(pooled_figs, figure)
        sbs = pooled_figs["sbs"][figure]
        lo, hi = paired_bootstrap(pooled["sbs"], pooled[other], figure, args.resamples, args.seed)
        d = deltas[figure]
        on_target = sum(x <= TARGET - 1 for x in d)
        entry["pooled"][figure] = {
            "sbs": sbs,
            "best": other,
            "best_value": value,
            "delta": sbs / value - 1,
            "interval": [lo, hi],
            "per_slice_deltas": d,
            "on_target": on_target,
        }
        md.append(
            f"| pooled ({len(pooled['sbs']):,} requests) | TTFT {figure} | {sbs * 1000:,.0f} | {other} "
            f"{value * 1000:,.0f} | {pct(sbs / value - 1)} | {pct(lo)} to {pct(hi)} | "
            f"{pct(statistics.fmean(d))} [{pct(min(d))}, {pct(max(d))}] | {on_target} of {len(d)} |"
        )
    entry["tpot_mean_s"] = tpot
    other = min((p for p in tpot if p != "sbs"), key=tpot.__getitem__)
    md += [
        "",
        f"TPOT mean over the slices: sbs {tpot['sbs'] * 1000:,.0f} ms, best baseline {other} "
        f"{tpot[other] * 1000:,.0f} ms ({pct(tpot['sbs'] / tpot[other] - 1)}).",
    ]
    return md, entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, minutes=10.0)
    ap.add_argument("--slices", type=int, default=5, help="consecutive slices of each trace [5]")
    ap.add_argument("--traces", default=",".join(TRACES))
    ap.add_argument("--policies", default=",".join(get_args(PolicyName)), help="sbs and the baselines [all]")
    ap.add_argument("--resamples", type=int, default=300, help="bootstrap resamples [300]")
    ap.add_argument("--seed", type=int, default=0, help="seed of the bootstrap [0]")
    ap.add_argument(
        "--settings",
        type=json.loads,
        default={},
        help='scheduling settings changed for sbs, JSON as in the YAML ({"allocator": {"shortest_first": true}})',
    )
    ap.add_argument(
        "--output", type=Path, default=RESULTS / "slices", help="path without suffix [bench/results/slices]"
    )
    args = ap.parse_args()
    started = time.perf_counter()
    policies = args.policies.split(",")
    base = SimConfig()
    settings_arg = f" --settings '{json.dumps(args.settings)}'" if args.settings else ""
    md = [
        "# The claim over several slices",
        "",
        f"Made by `python bench/slices.py --jobs {args.jobs}{settings_arg}`: {args.slices} consecutive "
        f"{args.minutes:g}-minute slices of each trace, each at {args.load:.0%} of its own analytic capacity "
        f"({base.instances} x {base.dp_size} ranks, virtual time). Delta: sbs against the best baseline per "
        f"figure (the lowest of any baseline on that slice, or pooled); target {pct(TARGET - 1)}. Pooled: all the "
        f"slices' requests together, with a 95% paired bootstrap interval ({args.resamples} resamples; requests of "
        "one burst are not independent, so it is too narrow). See the module docstring.",
    ]
    report: dict[str, Any] = {"config": {k: str(v) for k, v in vars(args).items()}, "traces": {}}
    with ProcessPoolExecutor(args.jobs) as pool:
        for name in args.traces.split(","):
            full = load_trace(resolve_trace(name))
            slices: list[Slice] = []
            for k in range(args.slices):
                trace = window(full, k * args.minutes * 60, args.minutes * 60)
                scale = slice_load(trace, 1.0, base.instances, base.dp_size).rate_scale_for(args.load)
                slices.append((k * args.minutes, trace, scale))
            jobs = [(policy, trace, scale) for _, trace, scale in slices for policy in policies]
            runs = list(pool.map(partial(run, settings=args.settings), *zip(*jobs, strict=True)))
            n = len(policies)
            per_slice = [
                dict(zip(policies, (r[0] for r in runs[i * n : (i + 1) * n]), strict=True)) for i in range(len(slices))
            ]
            tpot = {p: statistics.fmean(r[1] for r in runs[i::n]) for i, p in enumerate(policies)}
            section, entry = trace_section(name, slices, per_slice, tpot, args)
            md += section
            report["traces"][name] = entry
            print("\n".join(section), file=sys.stderr)
    write_outputs(args.output, report, md, started)


if __name__ == "__main__":
    main()
