"""Sensitivity of sbs against the best immediate-dispatch baseline, in virtual time.

Five sweeps on one trace at one load, each changing one setting from the defaults (2 instances x 8 ranks,
scrapes every 0.5 s arriving 0.05 s late, window 5 ms to 0.5 s):

- scrape interval and scrape lag (how stale the metrics the allocator starts from are), and the scrape
  interval again with state synchronisation off (then the scrapes are all any policy sees);
- DP size: 8, 32, 128 and 256 ranks in total at equal per-rank load (the rate grows with the ranks, the
  requests are the same);
- window bounds (``min_interval_s`` x ``max_interval_s``); baselines have no window, so they run once;
- the engines' chunked-prefill budget (``EngineModelConfig.max_prefill_tokens_per_step``, an engine setting, not
  the gateway's) at the same rate: a smaller budget makes shorter steps, which a request arriving mid-step waits
  out, at the price of less prefill per step.

At each point every baseline in ``--baselines`` runs and the best by TTFT mean is the one compared.

    .venv/bin/python bench/sensitivity.py --jobs 2

Writes ``bench/results/sensitivity.json`` and ``sensitivity.md``; the Markdown says how long it took.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from _harness import RESULTS
from _simbench import Variant, Workload, add_common_args, ms, run_variant, workload, write_outputs

from gateway.sim.calibration import EngineModelConfig

SCRAPE_INTERVALS_S = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)
SCRAPE_LAGS_S = (0.0, 0.05, 0.2, 0.5, 1.0)
TOTAL_RANKS = ((2, 4), (2, 16), (4, 32), (8, 32))  # (instances, dp_size): 8, 32, 128, 256 ranks
MIN_INTERVALS_S = (0.001, 0.005, 0.02, 0.05)
MAX_INTERVALS_S = (0.05, 0.5, 2.0)
BASE_RANKS = 16  # the 2 x 8 cluster the load is measured on
PREFILL_BUDGETS = (2048, 4096, 8192, 16384)


def _run(job: tuple[Variant, Workload]) -> dict[str, Any]:
    return run_variant(*job)


def compare(
    pool: ProcessPoolExecutor,
    points: list[tuple[str, dict[str, Any], dict[str, Any]]],
    work: Workload,
    baselines: list[str],
) -> list[dict[str, Any]]:
    """For each ``(label, window overrides, sim overrides)``: sbs and every baseline; the best baseline's figures."""
    jobs: list[tuple[Variant, Workload]] = []
    for label, window, sim in points:
        jobs.append((Variant(label, "sbs", {"window": window}, sim), work))
        jobs += [(Variant(label, b, {}, sim), work) for b in baselines]
    results = iter(pool.map(_run, jobs))
    out = []
    for label, _, _ in points:
        sbs = next(results)
        rivals = {b: next(results) for b in baselines}
        best = min(rivals, key=lambda b: rivals[b]["ttft_s"]["mean"])
        out.append({"point": label, "sbs": sbs, "best_baseline": best, "baseline": rivals[best], "all": rivals})
    return out


def table(title: str, rows: Iterable[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        f"## {title}",
        "",
        "| setting | sbs TTFT mean | p99 (ms) | best baseline | its TTFT mean | p99 (ms) | TTFT mean | p99 | "
        "TPOT mean sbs / baseline (ms) | SLO met sbs / baseline |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s, b = r["sbs"], r["baseline"]
        d_mean = s["ttft_s"]["mean"] / b["ttft_s"]["mean"] - 1
        d_p99 = s["ttft_s"]["p99"] / b["ttft_s"]["p99"] - 1
        lines.append(
            f"| {r['point']} | {ms(s['ttft_s']['mean'])} | {ms(s['ttft_s']['p99'])} | {r['best_baseline']} | "
            f"{ms(b['ttft_s']['mean'])} | {ms(b['ttft_s']['p99'])} | {d_mean:+.0%} | {d_p99:+.0%} | "
            f"{ms(s['tpot_s']['mean'])} / {ms(b['tpot_s']['mean'])} | "
            f"{s['slo_attainment']:.0%} / {b['slo_attainment']:.0%} |"
        )
    return lines


def scaled(work: Workload, ranks: int) -> Workload:
    """The same requests at the rate that gives ``ranks`` ranks the per-rank load ``work`` gives 16."""
    return Workload(work.trace, work.scale * ranks / BASE_RANKS, work.slo)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default="azure-conv")
    add_common_args(ap, minutes=10.0)
    ap.add_argument("--dp-minutes", type=float, default=20.0, help="slice for the DP-size sweep, minutes [20]")
    ap.add_argument("--baselines", default="round_robin,least_tokens,sglang_total_tokens,vllm_internal")
    ap.add_argument("--output", type=Path, default=RESULTS / "sensitivity")
    args = ap.parse_args()
    baselines = args.baselines.split(",")
    started = time.perf_counter()
    command = ("python bench/sensitivity.py " + " ".join(sys.argv[1:])).strip()
    work = workload(args.trace, args.minutes, args.load, 2, 8, args.slo_scale)
    report: dict[str, Any] = {"command": command, "rate_scale": work.scale, "slo": work.slo.as_dict(), "sweeps": {}}
    md = [
        "# sbs sensitivity (virtual time)",
        "",
        f"Made by `{command}`: {args.trace}, {args.minutes:g}-minute slice ({len(work.trace)} requests) at "
        f"{args.load:.0%} load of 2 x 8 ranks (rate x{work.scale:.2f}); the DP-size sweep uses a "
        f"{args.dp_minutes:g}-minute slice. Best baseline: the lowest TTFT mean among {', '.join(baselines)} at "
        "that point. The two percentage columns are sbs against it (negative: sbs is lower).",
    ]
    sweeps: dict[str, tuple[list[tuple[str, dict[str, Any], dict[str, Any]]], Workload]] = {
        "scrape interval (lag 0.05 s)": (
            [(f"{x:g} s", {}, {"scrape_interval_s": x}) for x in SCRAPE_INTERVALS_S],
            work,
        ),
        "scrape lag (interval 0.5 s)": ([(f"{x:g} s", {}, {"scrape_lag_s": x}) for x in SCRAPE_LAGS_S], work),
        "scrape interval without state sync (every policy sees scrapes only)": (
            [(f"{x:g} s", {}, {"scrape_interval_s": x, "state_sync": False}) for x in SCRAPE_INTERVALS_S],
            work,
        ),
        "chunked-prefill budget of the engines (same rate)": (
            [
                (f"{b:,} tokens", {}, {"engine": EngineModelConfig(max_prefill_tokens_per_step=b)})
                for b in PREFILL_BUDGETS
            ],
            work,
        ),
    }
    with ProcessPoolExecutor(args.jobs) as pool:
        for title, (points, w) in sweeps.items():
            report["sweeps"][title] = rows = compare(pool, points, w, baselines)
            md += table(title, rows)
            print(f"{title}: done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        dp_work = workload(args.trace, args.dp_minutes, args.load, 2, 8, args.slo_scale)
        dp_rows = []
        for instances, dp in TOTAL_RANKS:
            point: tuple[str, dict[str, Any], dict[str, Any]] = (
                f"{instances} x {dp} = {instances * dp} ranks",
                {},
                {"instances": instances, "dp_size": dp},
            )
            dp_rows += compare(pool, [point], scaled(dp_work, instances * dp), baselines)
            print(f"DP size {instances * dp}: done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        title = f"DP size at equal per-rank load ({len(dp_work.trace)} requests)"
        report["sweeps"][title] = dp_rows
        md += table(title, dp_rows)
        points = [
            (f"[{lo * 1000:g}, {hi * 1000:g}] ms", {"min_interval_s": lo, "max_interval_s": hi}, {})
            for lo in MIN_INTERVALS_S
            for hi in MAX_INTERVALS_S
            if lo <= hi
        ]
        first = compare(pool, points[:1], work, baselines)[0]
        rest = pool.map(
            _run, [(Variant(label, "sbs", {"window": window}, sim), work) for label, window, sim in points[1:]]
        )
        window_rows = [first] + [{**first, "point": p[0], "sbs": sbs} for p, sbs in zip(points[1:], rest, strict=True)]
        title = "window bounds [min_interval, max_interval]"
        report["sweeps"][title] = window_rows
        md += table(title, window_rows)
    machine = f" (wall clock, {os.cpu_count()} cores, 5-minute load average {os.getloadavg()[1]:.1f} at the end)"
    write_outputs(args.output, report, md, started, machine)


if __name__ == "__main__":
    main()
