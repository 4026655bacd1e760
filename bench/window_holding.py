"""When holding a window pays: sbs with and without each rule that closes a window as it opens (virtual time).

A window that opens holds its first request until the tick, unless holding cannot help
(``gateway.scheduling.step_aligned_close.close_at_once_reason``): an instance serving it is idle
(``window.close_when_idle``), every instance serving it aligns its own prefill (``window.yield_to_engine_alignment``),
or fewer than ``window.hold_min_arrivals`` more requests are expected while it is open. This script runs sbs with
every rule on (the default), with none (every window held to its tick), with the idle rule alone, and without the
alignment rule, beside ``phase_aware`` (the same cost placed on arrival), on the **tuning slice**: minutes 50-60
of each trace, which the evaluation's figures do not use (its steady runs are minutes 0-20, its transients 0-50),
unified and prefill-only instances, at ``--load`` of the reference rate the evaluation found (``evaluation.json``;
an ``-aligned`` preset takes its unaligned twin's, the same traffic), for each seed of ``--seeds``.

    .venv/bin/python bench/window_holding.py --jobs 2     # writes window_holding.json and .md in bench/results/
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from _simbench import ms

from gateway.sim.presets import prefill_only, preset
from gateway.sim.simulate import SimConfig, simulate
from gateway.workload.traces import load_trace, rescale, resolve_trace, window

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = ("realistic-sglang", "realistic-sglang-aligned", "realistic-vllm", "realistic-vllm-aligned")
TRACES = ("azure-conv", "azure-code", "mooncake-conv")
MODES = ("unified", "prefill-only")
HELD = {"close_when_idle": False, "yield_to_engine_alignment": False, "hold_min_arrivals": None}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "sbs (every rule)": ("sbs", {}),
    "held to the tick": ("sbs", HELD),
    "idle rule only": ("sbs", {"yield_to_engine_alignment": False, "hold_min_arrivals": None}),
    "no alignment rule": ("sbs", {"yield_to_engine_alignment": False}),
    "phase_aware": ("phase_aware", {}),
}
"""Row name → (policy, window settings overridden)."""


def run(job: tuple[str, str, str, str, float, int, int, float, float]) -> dict[str, Any]:
    """Simulate one variant on one case and seed; TTFT mean and p99 in seconds, and the windows closed at once."""
    preset_name, trace_name, mode, variant, scale, seed, dp_size, start_min, minutes = job
    policy, window_update = VARIANTS[variant]
    trace = window(load_trace(resolve_trace(trace_name)), start_min * 60, minutes * 60)
    if mode == "prefill-only":
        trace = prefill_only(trace)
    config = preset(preset_name, dp_size).apply(SimConfig(policy=policy, instances=2, dp_size=dp_size, seed=seed))
    config = replace(config, window=config.window.model_copy(update=window_update))
    result = simulate(rescale(trace, scale), config)
    summary = result.summary()
    return {
        "preset": preset_name,
        "trace": trace_name,
        "mode": mode,
        "variant": variant,
        "seed": seed,
        "ttft_s": {k: summary["ttft_s"][k] for k in ("mean", "p99")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, default=RESULTS / "evaluation.json", help="the evaluation's report")
    ap.add_argument("--presets", default=",".join(PRESETS), help=f"comma-separated [{','.join(PRESETS)}]")
    ap.add_argument("--load", type=float, default=0.7, help="fraction of the reference rate [0.7]")
    ap.add_argument("--start", type=float, default=50.0, help="slice start, minutes [50]")
    ap.add_argument("--minutes", type=float, default=10.0, help="slice length, minutes [10]")
    ap.add_argument("--seeds", default="0,1", help="comma-separated simulator seeds [0,1]")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--output", type=Path, default=RESULTS / "window_holding")
    args = ap.parse_args()
    reference = json.loads(args.reference.read_text())
    dp_size = int(reference["plan"]["dp_size"])
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs, skipped = [], []
    for preset_name in args.presets.split(","):
        twin = preset_name.removesuffix("-aligned")
        for trace_name in TRACES:
            for mode in MODES:
                case = reference["cases"].get(twin, {}).get(trace_name, {}).get(mode)
                scale = (case or {}).get("reference", {}).get("scale") or 0.0
                if scale <= 0:
                    skipped.append(f"{preset_name} {trace_name} {mode}")
                    continue
                for variant in VARIANTS:
                    for seed in seeds:
                        case_job = (preset_name, trace_name, mode, variant, args.load * scale, seed, dp_size)
                        jobs.append((*case_job, args.start, args.minutes))
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run, jobs))
    elapsed = time.perf_counter() - started
    command = " ".join(["python bench/window_holding.py", *sys.argv[1:]])
    md = [
        "# When holding the window pays (virtual time, tuning slice)",
        "",
        f"Made by `{command}`: minutes {args.start:g}-{args.start + args.minutes:g} of each trace (not used by the "
        f"evaluation's figures), 2 instances x {dp_size} DP ranks, {args.load:.0%} of the reference rate in "
        f"`{args.reference.name}`, seeds {args.seeds}. Each cell: TTFT mean / p99 in ms, the mean over seeds; in "
        "brackets the mean's change against sbs with every rule, per seed. `bench/window_holding.py`'s docstring "
        "defines each row.",
    ]
    if skipped:
        md += ["", "No reference rate (none sustainable in the evaluation), so not run: " + ", ".join(skipped) + "."]
    for preset_name in args.presets.split(","):
        if not any(r["preset"] == preset_name for r in rows):
            continue
        md += ["", f"## {preset_name}", "", "| trace | mode | " + " | ".join(VARIANTS) + " |"]
        md.append("|---|---|" + "---|" * len(VARIANTS))
        for trace_name in TRACES:
            for mode in MODES:
                cells = []
                base = [
                    r
                    for r in rows
                    if (r["preset"], r["trace"], r["mode"], r["variant"])
                    == (preset_name, trace_name, mode, "sbs (every rule)")
                ]
                if not base:
                    continue
                for variant in VARIANTS:
                    mine = [
                        r
                        for r in rows
                        if (r["preset"], r["trace"], r["mode"], r["variant"])
                        == (preset_name, trace_name, mode, variant)
                    ]
                    if any(r["ttft_s"]["mean"] is None for r in mine + base):  # no request finished
                        cells.append("–")
                        continue
                    mean = statistics.fmean(r["ttft_s"]["mean"] for r in mine)
                    p99 = statistics.fmean(r["ttft_s"]["p99"] for r in mine)
                    deltas = ", ".join(
                        f"{r['ttft_s']['mean'] / b['ttft_s']['mean'] - 1:+.0%}" for r, b in zip(mine, base, strict=True)
                    )
                    cells.append(f"{ms(mean)} / {ms(p99)}" + ("" if variant == "sbs (every rule)" else f" ({deltas})"))
                md.append(f"| {trace_name} | {mode} | " + " | ".join(cells) + " |")
    md += ["", f"Generated in {elapsed:.0f} s ({len(jobs)} simulations, {args.jobs} in parallel)."]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": command, "elapsed_s": elapsed, "skipped": skipped, "rows": rows}
    args.output.with_suffix(".json").write_text(json.dumps(report, indent=2))
    args.output.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {args.output}.md ({elapsed:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
