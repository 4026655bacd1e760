"""How well the gateway's fitted step-time model predicts the simulated engine's steps (issue 14, item 4).

The scheduler fits ``duration = a + b * H + c * S`` per instance from the steps it can time
(:class:`gateway.scheduling.step_clock.StepTimeModel`: ``H`` the heaviest rank's prefill tokens, ``S`` the ranks'
mean). This replays ten minutes of each trace at 70% of its analytic capacity through ``phase_aware`` under each
preset, and before each timed step enters the fit records what the model predicted for it and what it took (as the
gateway measured it: boundary to boundary of the token bursts, dispatch jitter included). It prints, per preset and
trace, the absolute error's mean and percentiles in ms and as a share of the step, how many steps were timed out
of all the engine ran, and the coefficients at the end, and writes ``bench/results/step_model_error.{json,md}``.

    .venv/bin/python bench/step_model_error.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from gateway.scheduling import step_clock
from gateway.scheduling.scheduler import Scheduler
from gateway.sim.capacity import cluster_load
from gateway.sim.presets import preset
from gateway.sim.simulate import SimConfig, _Sim
from gateway.workload.traces import load_trace, rescale, resolve_trace, window

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = ("realistic-sglang", "realistic-vllm", "idealised")
TRACES = ("azure-conv", "azure-code", "mooncake-conv")
LOAD = 0.7


def measure(preset_name: str, trace_name: str, minutes: float, instances: int, dp_size: int) -> dict[str, Any]:
    """One replay: prediction errors of every timed step, and the fitted coefficients at the end."""
    trace = window(load_trace(resolve_trace(trace_name)), 0.0, minutes * 60)
    chosen = preset(preset_name, dp_size)
    scale = cluster_load(trace, chosen.engine, instances, dp_size).rate_scale_for(LOAD)
    config = chosen.apply(SimConfig(policy="phase_aware", instances=instances, dp_size=dp_size))
    errors: list[tuple[float, float]] = []
    original = step_clock.StepTimeModel.observe

    def observe(model: step_clock.StepTimeModel, duration_s: float, heaviest: float, mean: float) -> None:
        errors.append((model.predict(heaviest, mean), duration_s))
        original(model, duration_s, heaviest, mean)

    step_clock.StepTimeModel.observe = observe  # type: ignore[method-assign,assignment]
    try:
        sim = _Sim(rescale(trace, scale), config)
        sim.run()
    finally:
        step_clock.StepTimeModel.observe = original  # type: ignore[method-assign]
    steps = sum(engine.steps_run for engine in sim.engines.values())
    settled = errors[len(errors) // 10 :]  # the first tenth is the fit's warm-up
    absolute = sorted(abs(p - d) for p, d in settled)
    relative = sorted(abs(p - d) / d for p, d in settled if d > 0)
    assert isinstance(sim.scheduler, Scheduler)  # one front door
    models = sim.scheduler.step_models()
    return {
        "preset": preset_name,
        "trace": trace_name,
        "timed_steps": len(errors),
        "engine_steps": steps,
        "mean_step_ms": 1000 * statistics.fmean(d for _, d in settled) if settled else None,
        "abs_error_ms": _quantiles(absolute, 1000.0),
        "rel_error": _quantiles(relative, 1.0),
        "coefficients": {e: {"a_s": m[0], "b_s_per_token": m[1], "c_s_per_token": m[2]} for e, m in models.items()},
        "engine": {
            "alltoall_s": chosen.engine.alltoall_s,
            "prefill_token_s": chosen.engine.prefill_token_s,
            "routed_expert_fraction": chosen.engine.routed_expert_fraction,
        },
    }


def _quantiles(values: list[float], unit: float) -> dict[str, float] | None:
    if not values:
        return None

    def at(q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] * unit

    return {"mean": statistics.fmean(values) * unit, "p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


def markdown(rows: list[dict[str, Any]], command: str) -> list[str]:
    md = [
        "# The fitted step-time model against the simulated engine",
        "",
        f"Made by `{command}`. Ten minutes of each trace at {LOAD:.0%} of its analytic capacity, `phase_aware`, "
        "2 x 8 ranks; every timed step's prediction (before the step entered the fit) against its duration as the "
        "gateway measured it. The first tenth of the timed steps (the fit's warm-up) is left out of the errors. "
        "A prefill-only instance times no step (its only tokens are first tokens), so its model stays at the prior "
        "and is not listed.",
        "",
        "| preset | trace | timed / engine steps | mean step | abs error mean / p50 / p90 / p99 | rel error p50 / p90 "
        "| fitted a, b, c (instance i0) | engine: all-to-all, prefill s/token, routed share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, rel = r["abs_error_ms"], r["rel_error"]
        c = r["coefficients"]["i0"]
        e = r["engine"]
        md.append(
            f"| {r['preset']} | {r['trace']} | {r['timed_steps']:,} / {r['engine_steps']:,} | "
            f"{r['mean_step_ms']:.1f} ms | {a['mean']:.2f} / {a['p50']:.2f} / {a['p90']:.2f} / {a['p99']:.2f} ms | "
            f"{rel['p50']:.1%} / {rel['p90']:.1%} | {c['a_s'] * 1000:.2f} ms, {c['b_s_per_token'] * 1e6:.1f} us, "
            f"{c['c_s_per_token'] * 1e6:.1f} us | {e['alltoall_s'] * 1000:.1f} ms, "
            f"{e['prefill_token_s'] * 1e6:.1f} us, {e['routed_expert_fraction']:.2f} |"
        )
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--output", type=Path, default=RESULTS / "step_model_error")
    args = ap.parse_args()
    rows = []
    for preset_name in PRESETS:
        for trace_name in TRACES:
            row = measure(preset_name, trace_name, args.minutes, 2, 8)
            rows.append(row)
            a = row["abs_error_ms"]
            print(
                f"{preset_name:18s} {trace_name:14s} timed {row['timed_steps']:>7,} of {row['engine_steps']:>7,}  "
                f"mean step {row['mean_step_ms']:.1f} ms  abs err mean {a['mean']:.2f} p90 {a['p90']:.2f} ms",
                file=sys.stderr,
            )
    command = " ".join(["python bench/step_model_error.py", *sys.argv[1:]])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    args.output.with_suffix(".md").write_text("\n".join(markdown(rows, command)) + "\n")


if __name__ == "__main__":
    main()
