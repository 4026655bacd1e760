"""What each of issue 14's remedies recovers, under the realistic defaults, in virtual time.

sbs with every remedy on, then each switched off (or, for what the gateway cannot have, an upper bound switched
on), beside the strongest baselines under the same information, on the steady-state run of the evaluation
(``bench/evaluate.py``: the first ``--minutes`` of each trace, unified and prefill-only instances) at ``--load``
of the reference rate the evaluation found for that preset, trace and mode:

- ``- upstream streaming``: the 30% of requests whose clients do not stream are not streamed from the engine
  either, so the scheduler sees no first token of theirs (``InformationLimits.stream_upstream`` off);
- ``- prefix index``: no index of the ranks' prefix caches; every prompt counts whole (``prefix_cache`` off);
- ``+ exact prompt counts``: the gateway knows every prompt's token count (the bound on what counting tokens
  right can recover; the preset's measured estimate error otherwise);
- ``+ online prompt-count correction``: the estimate scaled by the factor learnt from the engines' reported counts
  (``InformationLimits.online_correction``; the realistic presets leave it off);
- ``- closing at once``: every window held to its tick, even when an instance is idle, every engine aligns its own
  prefill or no other request is expected (``window.close_when_idle``, ``yield_to_engine_alignment`` off,
  ``hold_min_arrivals`` ``None``);
- ``- window``: the same cost placed on arrival (``phase_aware``);
- ``+ PrefillDelayer``: SGLang's own prefill alignment switched on (``realistic-sglang-aligned``), for sbs and for
  the best baseline, and for sbs with every window held to its tick (the window holding what the engine holds
  again).

The step-time model fitted on timed steps has no switch: the old model is gone (the note and
``bench/results/step_model_error.md`` give its before and after).

    .venv/bin/python bench/remedies.py --jobs 2          # writes remedies.json and remedies.md in bench/results/
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from _simbench import ms

from gateway.sim.presets import prefill_only, preset
from gateway.sim.simulate import SimConfig, derived_slo, simulate
from gateway.workload.traces import load_trace, rescale, resolve_trace, window

RESULTS = Path(__file__).resolve().parent / "results"
TRACES = ("azure-conv", "azure-code", "mooncake-conv")
MODES = ("unified", "prefill-only")
BASELINES = ("cache_aware", "least_load", "least_tokens")


@dataclass(frozen=True)
class Variant:
    """One row: a policy under a preset, with simulator settings and information limits overridden."""

    name: str
    policy: str = "sbs"
    preset: str = "realistic-sglang"
    sim: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)
    window: dict[str, Any] = field(default_factory=dict)


HELD = {"close_when_idle": False, "yield_to_engine_alignment": False, "hold_min_arrivals": None}
"""Window settings that hold every window to its tick."""


VARIANTS = (
    Variant("sbs, every remedy"),
    Variant("sbs - upstream streaming", limits={"stream_upstream": False}),
    Variant("sbs - prefix index", sim={"prefix_cache": None}),
    Variant("sbs + exact prompt counts", limits={"estimate_error": None}),
    Variant("sbs + online prompt-count correction", limits={"online_correction": True}),
    Variant("sbs - closing at once", window=HELD),
    Variant("sbs - window (phase_aware)", policy="phase_aware"),
    Variant("sbs + PrefillDelayer", preset="realistic-sglang-aligned"),
    Variant("sbs + PrefillDelayer - closing at once", preset="realistic-sglang-aligned", window=HELD),
    *(Variant(p, policy=p) for p in BASELINES),
    Variant("cache_aware - upstream streaming", policy="cache_aware", limits={"stream_upstream": False}),
    Variant("cache_aware + PrefillDelayer", policy="cache_aware", preset="realistic-sglang-aligned"),
)


def run(variant: Variant, trace_name: str, mode: str, minutes: float, scale: float, dp_size: int) -> dict[str, Any]:
    """Simulate one row on one case; TTFT and TPOT mean and p99, seconds."""
    trace = window(load_trace(resolve_trace(trace_name)), 0.0, minutes * 60)
    if mode == "prefill-only":
        trace = prefill_only(trace)
    chosen = preset(variant.preset, dp_size)
    config = chosen.apply(SimConfig(policy=variant.policy, instances=2, dp_size=dp_size))
    config = replace(
        config,
        limits=replace(config.limits, **variant.limits),
        window=config.window.model_copy(update=variant.window),
        **variant.sim,
    )
    started = time.perf_counter()
    result = simulate(rescale(trace, scale), config)
    summary = result.summary(derived_slo(trace, chosen.engine, 3.0))
    return {
        "variant": variant.name,
        "ttft_s": {k: summary["ttft_s"][k] for k in ("mean", "p99")},
        "tpot_s": {k: summary["tpot_s"].get(k) for k in ("mean", "p99")} if summary["tpot_s"] else None,
        "wall_s": time.perf_counter() - started,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, default=RESULTS / "evaluation.json", help="the evaluation's report")
    ap.add_argument("--load", type=float, default=0.7, help="fraction of the reference rate [0.7]")
    ap.add_argument("--minutes", type=float, default=20.0, help="the steady-state run, minutes [20]")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--output", type=Path, default=RESULTS / "remedies")
    args = ap.parse_args()
    reference = json.loads(args.reference.read_text())
    dp_size = int(reference["plan"]["dp_size"])
    started = time.perf_counter()
    command = " ".join(["python bench/remedies.py", *sys.argv[1:]])
    report: dict[str, Any] = {"command": command, "cases": {}}
    md = [
        "# What each remedy of issue 14 recovers (virtual time)",
        "",
        f"Made by `{command}`. Preset `realistic-sglang` (SGLang as shipped, measured prompt-token estimate error, "
        "30% of clients not streaming, 2 ms + up to 1 ms dispatch latency), 2 instances x "
        f"{dp_size} DP ranks, the first {args.minutes:g} minutes of each trace at {args.load:.0%} of the reference "
        f"rate in `{args.reference.name}` (its `realistic-sglang` case). Each sbs row switches one remedy off (or, "
        "marked +, a bound on one on); `bench/remedies.py`'s docstring defines each. TTFT and TPOT in ms, mean / p99.",
    ]
    with ProcessPoolExecutor(args.jobs) as pool:
        for trace_name in TRACES:
            for mode in MODES:
                case = reference["cases"]["realistic-sglang"][trace_name][mode]
                scale = args.load * case["reference"]["scale"]
                rows = list(
                    pool.map(
                        run,
                        VARIANTS,
                        [trace_name] * len(VARIANTS),
                        [mode] * len(VARIANTS),
                        [args.minutes] * len(VARIANTS),
                        [scale] * len(VARIANTS),
                        [dp_size] * len(VARIANTS),
                    )
                )
                report["cases"].setdefault(trace_name, {})[mode] = {"scale": scale, "rows": rows}
                best = min((r for r in rows if r["variant"] in BASELINES), key=lambda r: r["ttft_s"]["mean"])
                md += [
                    "",
                    f"## {trace_name}, {mode}",
                    "",
                    f"Rate x{scale:.3f}; best baseline on the TTFT mean: `{best['variant']}`.",
                    "",
                    "| configuration | TTFT mean / p99 | against the best baseline | TPOT mean / p99 |",
                    "|---|---|---:|---|",
                ]
                for r in rows:
                    t, p = r["ttft_s"], r["tpot_s"]
                    tpot = "–" if p is None else f"{ms(p['mean'])} / {ms(p['p99'])}"
                    delta = t["mean"] / best["ttft_s"]["mean"] - 1
                    md.append(f"| {r['variant']} | {ms(t['mean'])} / {ms(t['p99'])} | {delta:+.0%} | {tpot} |")
                print(f"{trace_name} {mode}: done", file=sys.stderr)
    elapsed = time.perf_counter() - started
    report["elapsed_s"] = elapsed
    md += ["", f"Generated in {elapsed:.0f} s ({args.jobs} in parallel)."]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(report, indent=2))
    args.output.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {args.output}.md ({elapsed:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
