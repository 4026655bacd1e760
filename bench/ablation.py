"""Ablation of sbs in virtual time: each component switched off in turn, against all on and immediate dispatch.

Components (settings of the ``window``, ``allocator`` and ``decode`` sections, and of ``SimConfig``):

- adaptive interval (``window.adaptive_interval``): the window tracks the measured step time;
- staggering (``allocator.use_step_phase``): batches are placed by each instance's step phase;
- step-aligned closes (``window.step_aligned_close``, off by default, so this row switches it *on*): the window
  closes just before an instance's predicted step start instead of on its grid tick;
- shortest prompt first (``allocator.shortest_first``, off by default, so this row switches it *on*);
- long-prefill isolation (``allocator.long_prefill_tokens``): long prompts kept together on instances already
  prefilling one, short prompts off them;
- phase-aware placement (``allocator.kind``): by predicted first-token time; off = prefill water-filling;
- water-filling capacity (``allocator.queue_steps``): what does not fit a rank's budgets waits;
- decode-aware choice (``decode``): two objectives, lexicographic;
- IQR outliers (``decode.iqr_k``): ranks beyond Tukey's fence are avoided;
- state synchronisation (``SimConfig.state_sync``): local accounting between scrapes.

    .venv/bin/python bench/ablation.py                          # Azure conv at 80% load
    .venv/bin/python bench/ablation.py --traces azure-conv,azure-code,mooncake-conv --jobs 2
    .venv/bin/python bench/ablation.py --instances 4 --output bench/results/ablation-4x8   # 4 x 8 ranks

Writes ``bench/results/ablation.json`` (every figure) and ``ablation.md`` (tables).
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from _harness import RESULTS
from _simbench import HEADER, Variant, add_common_args, row, run_variant, workload, write_outputs

VARIANTS = [
    Variant("sbs, defaults"),
    Variant("- adaptive interval", settings={"window": {"adaptive_interval": False}}),
    Variant("- staggering (phase-blind)", settings={"allocator": {"use_step_phase": False}}),
    Variant("+ step-aligned closes", settings={"window": {"step_aligned_close": {}}}),
    Variant("+ shortest prompt first", settings={"allocator": {"shortest_first": True}}),
    Variant("- long-prefill isolation", settings={"allocator": {"long_prefill_tokens": None}}),
    Variant("- phase-aware (water-filling only)", settings={"allocator": {"kind": "water_fill"}}),
    Variant("- water-filling capacity (no deferral)", settings={"allocator": {"queue_steps": None}}),
    Variant("- decode-aware choice", settings={"decode": None}),
    Variant("- IQR outliers", settings={"decode": {"iqr_k": None}}),
    Variant("- state sync (scrapes only)", sim={"state_sync": False}),
    Variant("round_robin", policy="round_robin"),
    Variant("least_tokens", policy="least_tokens"),
    Variant("sglang_total_tokens", policy="sglang_total_tokens"),
    Variant("shortest_queue", policy="shortest_queue"),
    Variant("vllm_internal", policy="vllm_internal"),
    Variant("power_of_two", policy="power_of_two"),
    Variant("random", policy="random"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", default="azure-conv")
    add_common_args(ap, minutes=20.0)
    ap.add_argument("--instances", type=int, default=2, help="engine instances of 8 DP ranks [2]")
    ap.add_argument("--output", type=Path, default=RESULTS / "ablation")
    args = ap.parse_args()
    started = time.perf_counter()
    command = ("python bench/ablation.py " + " ".join(sys.argv[1:])).strip()
    cluster = f"{args.instances} instances x 8 DP ranks"
    variants = [replace(v, sim={**v.sim, "instances": args.instances}) for v in VARIANTS]
    md = [
        "# sbs ablation (virtual time)",
        "",
        f"Made by `{command}`: {cluster} of the calibrated engine model, {args.minutes:g}-minute slice of each "
        f"trace at {args.load:.0%} load, SLO derived from the engine model (scale {args.slo_scale:g}). Each "
        "sbs row switches one component off (or, marked +, one that is off by default on); the rest are "
        "immediate-dispatch baselines on the same work. Times in ms; delta is TTFT mean against sbs with the "
        "defaults.",
    ]
    report: dict[str, Any] = {"command": command, "traces": {}}
    with ProcessPoolExecutor(args.jobs) as pool:
        for name in args.traces.split(","):
            work = workload(name, args.minutes, args.load, args.instances, 8, args.slo_scale)
            summaries = list(pool.map(partial(run_variant, work=work), variants))
            rows = {v.name: s for v, s in zip(variants, summaries, strict=True)}
            report["traces"][name] = {"rate_scale": work.scale, "slo": work.slo.as_dict(), "rows": rows}
            base = rows[VARIANTS[0].name]["ttft_s"]["mean"]
            md += ["", f"## {name}", "", f"{len(work.trace)} requests, rate x{work.scale:.2f}.", ""]
            md += ["| configuration " + HEADER[0] + " TTFT mean delta |", "|---" + HEADER[1] + "---:|"]
            for variant_name, s in rows.items():
                delta = s["ttft_s"]["mean"] / base - 1
                md.append(f"| {variant_name} {row(s)} {delta:+.0%} |")
            print(f"{name}: done", file=sys.stderr)
    write_outputs(args.output, report, md, started)


if __name__ == "__main__":
    main()
