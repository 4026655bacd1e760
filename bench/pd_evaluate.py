"""P/D disaggregation in virtual time: sbs against every per-leg baseline combination, steady state (issue 15).

The cluster is P/D pools (``gateway.sim.pd_driver``): by default 2 prefill instances of 8 DP ranks and 1 decode
instance of 16, under each realistic preset (``realistic-sglang`` with SGLang's bootstrap handoff,
``realistic-vllm`` with vLLM's NixlConnector), on the first ``--steady-minutes`` of each bundled trace. A contender
is a pair of leg policies, named ``prefill/decode``:

- ``sbs``: the staggered window and its allocator place the prefill legs; the decode allocation (running requests
  and KV tokens, IQR outliers, lexicographic) places the decode legs;
- every combination of a prefill baseline (:data:`PREFILL`: the SGLang Model Gateway's ``cache_aware``,
  ``least_load``, ``prefix_hash``, ``power_of_two`` and ``round_robin``, and under SGLang its own
  ``follow_bootstrap_room``) with a decode baseline (:data:`DECODE`), as ``smg --prefill-policy/--decode-policy``
  would run them; these are the **peers**;
- and sbs's own parts without the window, as the strongest non-peer baselines: ``phase_aware`` (sbs's prefill cost,
  placed at once) on the prefill leg, the decode allocation (``sbs``) on the decode leg.

Per preset and trace:

1. **Stage 1**: the sustainable rate of ``cache_aware/least_load`` (``gateway.sim.steady_state``: no backlog growth
   over the second half, 90% of requests within the SLO), then every contender at 80% of it; the best peer and the
   best non-sbs contender by TTFT mean are kept.
2. **Stage 2**: the sustainable rate of sbs, the best peer and the best non-sbs contender; the best peer's is the
   reference (so every steady load below is within the peer's own reach).
3. **Stage 3 (the figures)**: sbs, the best peer and the best non-sbs contender at 50%, 70% and 90% of the
   reference; TTFT mean and p99 against the best peer, with the spread over the run's fifths by arrival.

The SLO is TTFT <= 3 x the request's unloaded TTFT (its prefill steps and KV transfer) + one full prefill step, and
TPOT <= 50 ms (production DeepSeek runs at 45-50 ms); goodput is also given under TTFT 2 s / TPOT 50 ms.

    .venv/bin/python bench/pd_evaluate.py --jobs 2                  # writes bench/results/pd_evaluation.{json,md}
    .venv/bin/python bench/pd_evaluate.py --quick                   # one preset, one trace, a 2-minute run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from evaluate import FIFTHS, fifths, ms, pct, request_rate, spread

from gateway.sim.capacity import cluster_load
from gateway.sim.pd_driver import PdPools
from gateway.sim.presets import prefill_only, preset, preset_flavor
from gateway.sim.simulate import SimConfig, SimResult, Slo, simulate
from gateway.sim.steady_state import max_sustainable_scale, steadiness
from gateway.workload.traces import TraceRequest, load_trace, rescale, resolve_trace, window

RESULTS = Path(__file__).parent / "results"
TRACES = ("azure-conv", "azure-code", "mooncake-conv")
PRESETS = ("realistic-sglang", "realistic-vllm")
PREFILL = ("cache_aware", "least_load", "prefix_hash", "power_of_two", "round_robin")
DECODE = ("least_load", "round_robin", "power_of_two")
OWN = ("phase_aware", "sbs")
"""sbs's own parts placed at once: the prefill cost (``phase_aware``) and the decode allocation (``sbs``)."""
REFERENCE_PROBE = "cache_aware/least_load"
STAGE1_LOAD = 0.8
STEADY_LOADS = (0.5, 0.7, 0.9)
TPOT_S = 0.05
TTFT_SCALE = 3.0


@dataclass(frozen=True)
class Plan:
    """What one P/D evaluation runs (see the module docstring)."""

    presets: tuple[str, ...] = PRESETS
    traces: tuple[str, ...] = TRACES
    steady_minutes: float = 10.0
    prefill_instances: int = 2
    prefill_dp_size: int = 8
    decode_instances: int = 1
    decode_dp_size: int = 16
    bisection_steps: int = 5
    rate_range: tuple[float, float] = (0.01, 1.0)
    seed: int = 0


QUICK = Plan(presets=("realistic-sglang",), traces=("azure-conv",), steady_minutes=2.0, bisection_steps=2)


def contenders(connector: str) -> list[str]:
    """Every ``prefill/decode`` pair run in stage 1: sbs, the peers, and the pairs with sbs's own parts."""
    prefill = PREFILL + (("follow_bootstrap_room",) if connector == "sglang" else ())
    peers = [f"{p}/{d}" for p in prefill for d in DECODE]
    own = [f"{p}/{d}" for p in (*prefill, "phase_aware") for d in (*DECODE, "sbs") if "phase_aware" in p or d == "sbs"]
    return ["sbs", *peers, *own]


def is_peer(name: str) -> bool:
    """Whether ``name`` places both legs as a peer router can (no part of sbs)."""
    return name != "sbs" and not any(part in OWN for part in name.split("/"))


def pd_slos(trace: list[TraceRequest], config: SimConfig) -> dict[str, Slo]:
    """The SLOs of the module docstring, by name."""
    engine = config.engine
    full_step = engine.alltoall_s + engine.prefill_chunk_s(engine.max_prefill_tokens_per_step, 0)
    return {
        "3x unloaded/50ms": Slo(ttft_s=full_step, tpot_s=TPOT_S, ttft_per_unloaded=TTFT_SCALE),
        "2s/50ms": Slo(ttft_s=2.0, tpot_s=TPOT_S),
    }


@dataclass(frozen=True)
class Job:
    """One simulation: a contender under a preset on a trace at a rate scale."""

    preset: str
    contender: str
    trace: list[TraceRequest]
    scale: float
    plan: Plan

    def config(self) -> SimConfig:
        flavour = preset_flavor(self.preset)
        if flavour is None:
            raise ValueError("a P/D evaluation needs a realistic preset: its flavour sets the KV connector")
        if self.contender == "sbs":
            policy, prefill, decode = "sbs", None, None
        else:
            policy, decode = self.contender.split("/")
            prefill = None
            if policy == "follow_bootstrap_room":
                policy, prefill = "round_robin", "follow_bootstrap_room"
        p = self.plan
        pools = PdPools(
            p.prefill_instances,
            p.prefill_dp_size,
            p.decode_instances,
            p.decode_dp_size,
            connector=flavour,
            prefill_policy=prefill,
            decode_policy=decode,
        )
        base = SimConfig(policy=policy, seed=p.seed, pd=pools)
        return preset(self.preset, p.prefill_dp_size).apply(base)

    def simulate(self) -> SimResult:
        return simulate(rescale(self.trace, self.scale), self.config())


def run_job(job: Job) -> dict[str, Any]:
    """Simulate ``job``: TTFT, TPOT, throughput, goodput under each SLO, steadiness and the per-fifth TTFT."""
    started = time.perf_counter()
    result = job.simulate()
    slos = pd_slos(job.trace, job.config())
    first = next(iter(slos.values()))
    summary = result.summary(first)
    ranks = job.plan.prefill_instances * job.plan.prefill_dp_size
    return {
        "contender": job.contender,
        "scale": job.scale,
        "ttft_s": summary["ttft_s"],
        "tpot_s": summary["tpot_s"],
        "completed": summary["completed"],
        "output_throughput_tok_s": summary["output_throughput_tok_s"],
        "goodput": {name: result.goodput(slo) for name, slo in slos.items()},
        "steadiness": steadiness(result, first, ranks).as_dict(),
        "fifths": fifths(result),
        "wall_s": time.perf_counter() - started,
    }


def search_rate(job: Job, lo: float, hi: float, steps: int) -> dict[str, Any]:
    """The maximum sustainable rate scale of ``job``'s contender (``job.scale`` is ignored)."""
    ranks = job.plan.prefill_instances * job.plan.prefill_dp_size
    slo = next(iter(pd_slos(job.trace, job.config()).values()))

    def sustainable(scale: float) -> bool:
        return steadiness(replace(job, scale=scale).simulate(), slo, ranks).sustainable

    found = max_sustainable_scale(sustainable, lo, hi, steps)
    return {"contender": job.contender, "scale": found.scale, "probes": found.probes}


def best(rows: dict[str, dict[str, Any]], keep: Any) -> str:
    """The contender with the lowest TTFT mean among ``rows`` for which ``keep(name)`` holds."""
    return min((c for c in rows if keep(c)), key=lambda c: float(rows[c]["ttft_s"]["mean"]))


def evaluate_case(plan: Plan, preset_name: str, trace_name: str, pool: Executor) -> dict[str, Any]:
    """One preset and trace: the three stages of the module docstring."""
    trace = window(load_trace(resolve_trace(trace_name)), 0.0, plan.steady_minutes * 60)
    engine = preset(preset_name, plan.prefill_dp_size).engine
    prefill_capacity = cluster_load(prefill_only(trace), engine, plan.prefill_instances, plan.prefill_dp_size)
    lo, hi = (prefill_capacity.rate_scale_for(f) for f in plan.rate_range)

    def job(contender: str, scale: float = 1.0) -> Job:
        return Job(preset_name, contender, trace, scale, plan)

    def search(names: list[str]) -> dict[str, dict[str, Any]]:
        n = len(names)
        return {
            s["contender"]: s
            for s in pool.map(search_rate, map(job, names), [lo] * n, [hi] * n, [plan.bisection_steps] * n)
        }

    probe = search([REFERENCE_PROBE])[REFERENCE_PROBE]
    case: dict[str, Any] = {"requests": len(trace), "prefill_capacity": prefill_capacity.as_dict(), "probe": probe}
    if probe["scale"] <= 0:
        return case
    connector = job("sbs").config().pd.connector  # type: ignore[union-attr]
    names = contenders(connector)
    stage1 = {r["contender"]: r for r in pool.map(run_job, [job(c, STAGE1_LOAD * probe["scale"]) for c in names])}
    peer = best(stage1, is_peer)
    other = best(stage1, lambda c: c != "sbs")
    finalists = list(dict.fromkeys(["sbs", peer, other]))
    rates = search(finalists)
    reference = rates[peer]["scale"]
    case |= {
        "stage1": {"scale": STAGE1_LOAD * probe["scale"], "rows": stage1},
        "best_peer": peer,
        "best_other": other,
        "max_sustainable": {
            c: {
                "scale": s["scale"],
                "rps": request_rate(trace, s["scale"]) if s["scale"] else 0.0,
                "probes": s["probes"],
            }
            for c, s in rates.items()
        },
        "steady": {},
    }
    if reference > 0:
        jobs = [job(c, f * reference) for f in STEADY_LOADS for c in finalists]
        runs = list(pool.map(run_job, jobs))
        n = len(finalists)
        for i, f in enumerate(STEADY_LOADS):
            rows = {r["contender"]: r for r in runs[i * n : (i + 1) * n]}
            case["steady"][str(f)] = {"scale": f * reference, "rps": request_rate(trace, f * reference), "rows": rows}
    return case


def fifth_deltas(rows: dict[str, dict[str, Any]], other: str, figure: str) -> list[float]:
    """sbs's TTFT ``figure`` over ``other``'s, minus 1, in each fifth of the run."""
    out = []
    for i in range(FIFTHS):
        a, b = rows["sbs"]["fifths"][i], rows[other]["fifths"][i]
        if a and b:
            out.append(a[figure] / b[figure] - 1)
    return out


def markdown(report: dict[str, Any], command: str) -> list[str]:
    plan = report["plan"]
    out = [
        "# P/D disaggregation in virtual time: sbs against per-leg baselines",
        "",
        f"`{command}` ({plan['prefill_instances']} x {plan['prefill_dp_size']} prefill ranks, "
        f"{plan['decode_instances']} x {plan['decode_dp_size']} decode ranks; first {plan['steady_minutes']:g} "
        "minutes of each trace; `bench/pd_evaluate.py` says how each stage runs).",
        "",
        "A contender is `prefill leg policy/decode leg policy`. **Peers** use only policies a peer router offers "
        "(`smg --prefill-policy/--decode-policy`, SGLang's `follow_bootstrap_room`); `phase_aware` (sbs's prefill "
        "cost without the window) and the decode allocation `sbs` are sbs's own parts. Steady loads are fractions "
        "of the best peer's own sustainable rate.",
        "",
        "## Summary: sbs against the best peer, steady state",
        "",
        "| preset | trace | best peer | sustainable rate sbs / peer | load | TTFT mean | p99 | per-fifth mean "
        "[min, max] | TPOT mean sbs / peer (ms) | vs best non-sbs (mean) |",
        "|---|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    details: list[str] = []
    for name, traces in report["cases"].items():
        for trace, case in traces.items():
            if "steady" not in case:
                out.append(f"| {name} | {trace} | – | not sustainable at the lowest probe | | | | | | |")
                continue
            peer, other = case["best_peer"], case["best_other"]
            rates = case["max_sustainable"]
            ratio = rates["sbs"]["scale"] / rates[peer]["scale"] if rates[peer]["scale"] else float("nan")
            for load, steady in case["steady"].items():
                rows = steady["rows"]
                s, p, o = rows["sbs"], rows[peer], rows[other]
                mean = s["ttft_s"]["mean"] / p["ttft_s"]["mean"] - 1
                p99 = s["ttft_s"]["p99"] / p["ttft_s"]["p99"] - 1
                vs_other = s["ttft_s"]["mean"] / o["ttft_s"]["mean"] - 1
                out.append(
                    f"| {name} | {trace} | {peer} | {ratio:.2f}x | {float(load):.0%} ({steady['rps']:.1f} req/s) | "
                    f"{pct(mean)} | {pct(p99)} | {spread(fifth_deltas(rows, peer, 'mean'))} | "
                    f"{ms(s['tpot_s']['mean'])} / {ms(p['tpot_s']['mean'])} | {pct(vs_other)} ({other}) |"
                )
            details += [f"## {name}, {trace}", "", f"{case['requests']} requests.", ""]
            details += ["Sustainable rate (req/s): " + ", ".join(f"{c} {r['rps']:.2f}" for c, r in rates.items()), ""]
            for load, steady in case["steady"].items():
                details += [f"Steady at {float(load):.0%} of {peer}'s rate ({steady['rps']:.2f} req/s):", ""]
                details += table(steady["rows"])
                details.append("")
            stage1 = case["stage1"]
            details += [f"Stage 1, every contender at {stage1['scale']:.3g} x the trace's rate:", ""]
            ranked = dict(sorted(stage1["rows"].items(), key=lambda kv: kv[1]["ttft_s"]["mean"]))
            details += table(ranked)
            details.append("")
    return [*out, "", *details]


def table(rows: dict[str, dict[str, Any]]) -> list[str]:
    names = list(next(iter(rows.values()))["goodput"])
    out = [
        "| contender | TTFT mean | p99 (ms) | TPOT mean (ms) | output tok/s | "
        + " | ".join(f"goodput {n}" for n in names)
        + " | backlog growth / allowed |",
        "|---|" + "---:|" * (5 + len(names)),
    ]
    for c, r in rows.items():
        good = " | ".join(
            f"{r['goodput'][n]['goodput_rps']:.2f} ({r['goodput'][n]['slo_attainment']:.0%})" for n in names
        )
        st = r["steadiness"]
        out.append(
            f"| {c} | {ms(r['ttft_s']['mean'])} | {ms(r['ttft_s']['p99'])} | {ms(r['tpot_s']['mean'])} | "
            f"{r['output_throughput_tok_s']:.0f} | {good} | {st['growth']:.0f} / {st['allowed']:.0f}"
            f"{'' if st['steady'] else ' (grows)'} |"
        )
    return out


def write(output: Path, report: dict[str, Any], command: str, footer: str) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(report, indent=2))
    output.with_suffix(".md").write_text("\n".join([*markdown(report, command), footer]) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke test: one preset, one trace, a 2-minute run")
    ap.add_argument("--jobs", type=int, default=1, help="simulations run in parallel processes [1]")
    ap.add_argument("--presets", help=f"comma-separated [{','.join(PRESETS)}]")
    ap.add_argument("--traces", help=f"comma-separated [{','.join(TRACES)}]")
    ap.add_argument("--steady-minutes", type=float, help="minutes of each trace [10]")
    ap.add_argument("--prefill-pool", help="INSTANCESxDP [2x8]")
    ap.add_argument("--decode-pool", help="INSTANCESxDP [1x16]")
    ap.add_argument("--output", type=Path, help="path without suffix [bench/results/pd_evaluation(_quick)]")
    args = ap.parse_args()
    plan = QUICK if args.quick else Plan()
    if args.presets:
        plan = replace(plan, presets=tuple(args.presets.split(",")))
    if args.traces:
        plan = replace(plan, traces=tuple(args.traces.split(",")))
    if args.steady_minutes:
        plan = replace(plan, steady_minutes=args.steady_minutes)
    if args.prefill_pool:
        n, dp = (int(x) for x in args.prefill_pool.split("x"))
        plan = replace(plan, prefill_instances=n, prefill_dp_size=dp)
    if args.decode_pool:
        n, dp = (int(x) for x in args.decode_pool.split("x"))
        plan = replace(plan, decode_instances=n, decode_dp_size=dp)
    output = args.output or RESULTS / ("pd_evaluation_quick" if args.quick else "pd_evaluation")
    command = " ".join(["python bench/pd_evaluate.py", *sys.argv[1:]])
    started = time.perf_counter()
    report: dict[str, Any] = {"plan": asdict(plan), "cases": {}}
    with ProcessPoolExecutor(args.jobs) as pool:
        for name in plan.presets:
            for trace in plan.traces:
                case = evaluate_case(plan, name, trace, pool)
                report["cases"].setdefault(name, {})[trace] = case
                print(f"{name} {trace}: best peer {case.get('best_peer')}", file=sys.stderr)
                write(output, report, command, f"Partial: {time.perf_counter() - started:.0f} s so far.")
    elapsed = time.perf_counter() - started
    report["elapsed_s"] = elapsed
    runs = [
        r
        for traces in report["cases"].values()
        for case in traces.values()
        for r in [*case.get("stage1", {}).get("rows", {}).values()]
        + [r for s in case.get("steady", {}).values() for r in s["rows"].values()]
    ]
    wall = sum(r["wall_s"] for r in runs)
    write(
        output, report, command, f"Generated in {elapsed:.0f} s ({args.jobs} in parallel; {wall:.0f} s of load runs)."
    )
    print(f"wrote {output}.md ({elapsed:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
