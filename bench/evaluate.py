"""The evaluation of issue 13: every policy under the realistic preset, steady state first, in virtual time.

For each preset (``gateway.sim.presets``: the realistic ones first, ``idealised`` kept as a labelled column), each
trace (Azure 2023 conversation and code, Mooncake conversation) and each instance mode
(``unified``: prefill and decode on every rank; ``prefill-only``: every output one token, the P/D prefill pool,
``gateway.sim.presets.prefill_only``):

1. **Maximum sustainable rate** (``gateway.sim.steady_state``) of each baseline in ``--rate-policies`` on the
   steady-state run (the whole trace hour, or ``--steady-minutes``): the highest rate scale at which the backlog
   does not grow over the second half and at least 90% of requests meet the derived SLO, by geometric bisection
   over ``Plan.rate_range`` (fractions of the run's analytic capacity, ``gateway.sim.capacity``: 1% to 100%, since
   bursty Azure code sustains under 10% of its mean-rate capacity; the top of the range is never run). The best
   baseline's is the reference rate.
2. **Steady state (primary)**: every policy on the same run at 50%, 70% and 90% of the reference rate (for an
   ``-aligned`` preset, the same flavour's plain preset's reference: the same traffic with the engine's own
   alignment on). Five slices
   per figure: the run's requests in fifths by arrival, sbs against the best baseline per fifth, with the spread.
3. **Transients (secondary)**: every policy on ``--transient-slices`` consecutive ``--transient-minutes`` slices,
   each at 80% of its own analytic capacity (the earlier reports' setting), pooled, with the per-slice spread.

SLOs, with goodput under each in every table: ``derived`` (``gateway.sim.simulate.derived_slo``, scale 3, on the
preset's engine model), TTFT 2 s with TPOT 50 ms and 100 ms, and the derived TTFT with TPOT 50 ms and 100 ms (a
flat 2 s is out of reach for Mooncake's long prompts; the unified model's TPOT rarely meets 100 ms, and a
prefill-only instance meets any TPOT objective trivially).

The default plan is cut to what one session can run (measured December 2026: a 20-minute steady run at 2 x 8 under
``realistic-sglang`` takes about 13 s of CPU on Azure conv and 17 s on Mooncake near the reference rate, 5 s
prefill-only, several times more when overloaded; the whole plan about 100 minutes at ``--jobs 2``): five presets
(``realistic-sglang`` as the headline, ``realistic-vllm``, each with its ``-aligned`` twin for the engine's own
prefill alignment, and ``idealised`` as the labelled column); the first 20 minutes of each trace as the steady-state
run; :data:`REPORT_POLICIES` (sbs and the strongest baselines of issue 13, one per rule); the rate searched for
``cache_aware`` (the SGLang Model Gateway's default) and ``phase_aware`` (sbs's cost placed at once; ``cache_aware``
places a prompt that shares no block with an earlier one exactly as ``least_load`` does, so on the Azure traces the
search covers that too), 5 geometric bisections over 1-100% of the analytic capacity (each answer within a factor
1.155 below the threshold). Every one of these is an option; the whole hour, every policy and every baseline's rate
search is ``--steady-minutes 0 --policies all --rate-policies all`` (some 25 CPU-hours).

    .venv/bin/python bench/evaluate.py --jobs 2          # writes evaluation.{json,md} in bench/results/
    .venv/bin/python bench/evaluate.py --quick           # a one-minute smoke test: evaluation_quick.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, get_args

from gateway.config import PolicyName
from gateway.sim.capacity import cluster_load
from gateway.sim.presets import PRESET_NAMES, prefill_only, preset
from gateway.sim.simulate import SimConfig, SimResult, Slo, derived_slo, simulate
from gateway.sim.steady_state import max_sustainable_scale, steadiness
from gateway.workload.traces import TraceRequest, load_trace, rescale, resolve_trace, window

RESULTS = Path(__file__).parent / "results"
TRACES = ("azure-conv", "azure-code", "mooncake-conv")
MODES = ("unified", "prefill-only")
STEADY_LOADS = (0.5, 0.7, 0.9)
"""Steady-state loads, fractions of the best baseline's maximum sustainable rate (issue 13)."""
TRANSIENT_LOAD = 0.8
"""Load of each transient slice, fraction of its analytic capacity (the earlier reports' "80%")."""
FIXED_TTFT_S = 2.0
FIXED_TPOT_S = (0.05, 0.1)
"""Fixed SLOs (issue 13): TTFT 2 s, TPOT 50 and 100 ms (production DeepSeek runs at 45-50 ms TPOT)."""
FIFTHS = 5
QUICK_POLICIES = ("sbs", "least_tokens", "phase_aware")
REPORT_POLICIES = (
    "sbs",
    "phase_aware",
    "cache_aware",
    "least_load",
    "prefix_hash",
    "sglang_total_tokens",
    "vllm_dplb",
    "least_tokens",
)
"""The report's policies: sbs; the same cost without a window; the SGLang Model Gateway's ``cache_aware``,
``least_load`` and ``prefix_hash``; SGLang's and vLLM 0.34's own DP balancing; and ``least_tokens``, the earlier
reports' baseline. The other registered baselines (round robin, random, power of two, shortest queue,
least_waiting, vllm_internal) are weaker rules of the same kinds and join with ``--policies all``."""
LIST_OPTIONS = ("presets", "traces", "policies", "rate_policies")


@dataclass(frozen=True)
class Plan:
    """What one evaluation runs.

    Attributes:
        presets: preset names (:data:`gateway.sim.presets.PRESET_NAMES`); the first is the headline.
        traces: bundled trace names.
        modes: instance modes (:data:`MODES`).
        policies: every policy run at each load (``sbs`` and the baselines).
        rate_policies: the baselines whose maximum sustainable rate is searched; the best sets the reference.
        steady_minutes: length of the steady-state run, minutes of the trace's clock; ``None`` = the whole trace.
        transient_minutes: length of each transient slice, minutes.
        transient_slices: consecutive transient slices per trace.
        instances: engine instances.
        dp_size: DP ranks per instance.
        bisection_steps: bisections of the rate search (``steps + 1`` runs per baseline).
        rate_range: the rate search's range, fractions of the steady run's analytic capacity.
        slo_scale: scale of the derived SLO.
        seed: the simulations' seed (information limits' draws, randomised policies).
    """

    presets: tuple[str, ...] = (
        "realistic-sglang",
        "realistic-sglang-aligned",
        "realistic-vllm",
        "realistic-vllm-aligned",
        "idealised",
    )
    traces: tuple[str, ...] = TRACES
    modes: tuple[str, ...] = MODES
    policies: tuple[str, ...] = REPORT_POLICIES
    rate_policies: tuple[str, ...] = ("cache_aware", "phase_aware")
    steady_minutes: float | None = 20.0
    transient_minutes: float = 10.0
    transient_slices: int = 5
    instances: int = 2
    dp_size: int = 8
    bisection_steps: int = 5
    rate_range: tuple[float, float] = (0.01, 1.0)
    slo_scale: float = 3.0
    seed: int = 0


QUICK = Plan(
    presets=("realistic-sglang", "idealised"),
    traces=("azure-conv",),
    policies=QUICK_POLICIES,
    rate_policies=("least_tokens",),
    steady_minutes=2.0,
    transient_minutes=1.0,
    bisection_steps=2,
)
"""``--quick``: two presets, one trace, three policies, a 2-minute "steady" run, five 1-minute slices."""


def named_slos(trace: list[TraceRequest], preset_name: str, dp_size: int, scale: float) -> dict[str, Slo]:
    """The SLOs every table reports goodput under (module docstring), by name."""
    derived = derived_slo(trace, preset(preset_name, dp_size).engine, scale)
    out = {"derived": derived}
    for tpot in FIXED_TPOT_S:
        out[f"2s/{tpot * 1000:.0f}ms"] = Slo(ttft_s=FIXED_TTFT_S, tpot_s=tpot)
    for tpot in FIXED_TPOT_S:
        out[f"derived TTFT/{tpot * 1000:.0f}ms"] = replace(derived, tpot_s=tpot)
    return out


@dataclass(frozen=True)
class Job:
    """One simulation: a policy under a preset on a trace at a rate scale, judged against named SLOs."""

    preset: str
    policy: str
    trace: list[TraceRequest]
    scale: float
    slos: dict[str, Slo]
    instances: int
    dp_size: int
    seed: int

    def config(self) -> SimConfig:
        base = SimConfig(policy=self.policy, instances=self.instances, dp_size=self.dp_size, seed=self.seed)
        return preset(self.preset, self.dp_size).apply(base)

    def simulate(self) -> SimResult:
        return simulate(rescale(self.trace, self.scale), self.config())


def fifths(result: SimResult) -> list[dict[str, float]]:
    """TTFT mean and p99 (seconds) of each fifth of the run's requests by arrival."""
    records, out = result.records, []
    size = len(records) / FIFTHS
    for i in range(FIFTHS):
        ttft = sorted(r.ttft_s for r in records[round(i * size) : round((i + 1) * size)] if r.first_token_s is not None)
        out.append({"mean": statistics.fmean(ttft), "p99": ttft[int(0.99 * (len(ttft) - 1))]} if ttft else {})
    return out


def run_job(job: Job) -> dict[str, Any]:
    """Simulate ``job``: its summary under the derived SLO, goodput under every SLO, steadiness and the per-fifth
    TTFT figures, with the run's wall time."""
    started = time.perf_counter()
    result = job.simulate()
    summary = result.summary(job.slos["derived"])
    ranks = job.instances * job.dp_size
    return {
        "policy": job.policy,
        "ttft_s": summary["ttft_s"],
        "tpot_s": summary["tpot_s"],
        "completed": summary["completed"],
        "output_throughput_tok_s": summary["output_throughput_tok_s"],
        "goodput": {name: result.goodput(slo) for name, slo in job.slos.items()},
        "steadiness": steadiness(result, job.slos["derived"], ranks).as_dict(),
        "fifths": fifths(result),
        "wall_s": time.perf_counter() - started,
    }


def search_rate(job: Job, lo: float, hi: float, steps: int) -> dict[str, Any]:
    """The maximum sustainable rate scale of ``job``'s policy on its trace (``job.scale`` is ignored)."""
    ranks = job.instances * job.dp_size

    def sustainable(scale: float) -> bool:
        return steadiness(replace(job, scale=scale).simulate(), job.slos["derived"], ranks).sustainable

    found = max_sustainable_scale(sustainable, lo, hi, steps)
    return {"policy": job.policy, "scale": found.scale, "probes": found.probes}


def request_rate(trace: list[TraceRequest], scale: float) -> float:
    return len(trace) / ((trace[-1].arrival_s - trace[0].arrival_s) / scale)


OWN_FORMS = ("sbs", "phase_aware")
"""sbs and its own cost placed without a window: left out of the "best peer" comparisons."""


def best_ttft(rows: dict[str, dict[str, Any]], figure: str, exclude: tuple[str, ...] = ("sbs",)) -> str:
    """The baseline with the lowest TTFT ``figure`` among ``rows``, not counting the policies in ``exclude``."""
    return min((p for p in rows if p not in exclude), key=lambda p: float(rows[p]["ttft_s"][figure]))


def deltas_per_fifth(rows: dict[str, dict[str, Any]], figure: str, exclude: tuple[str, ...] = ("sbs",)) -> list[float]:
    """sbs's TTFT ``figure`` over the best baseline's (not counting ``exclude``), minus 1, in each fifth (best per
    fifth)."""
    out = []
    for i in range(FIFTHS):
        have = {p: r["fifths"][i][figure] for p, r in rows.items() if r["fifths"][i]}
        others = [p for p in have if p not in exclude]
        if "sbs" in have and others:
            other = min(others, key=have.__getitem__)
            out.append(have["sbs"] / have[other] - 1)
    return out


def evaluate_case(
    plan: Plan,
    preset_name: str,
    trace_name: str,
    mode: str,
    pool: Executor,
    load: Callable[[str], list[TraceRequest]],
    shared_reference: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One preset, trace and mode: the rate search, the steady-state runs and the transients.

    ``shared_reference`` (``{"policy", "scale", "preset"}``), given for an ``-aligned`` preset, sets the steady
    loads from the same flavour's plain preset's reference, so that both run the same traffic (the engine's own
    alignment switched on or not); the aligned preset's own sustainable rates are still searched and reported.
    """
    transform: Callable[[list[TraceRequest]], list[TraceRequest]] = prefill_only if mode == "prefill-only" else list
    full = load(trace_name)
    steady = transform(window(full, 0.0, None if plan.steady_minutes is None else plan.steady_minutes * 60))
    engine = preset(preset_name, plan.dp_size).engine
    capacity = cluster_load(steady, engine, plan.instances, plan.dp_size)
    slos = named_slos(steady, preset_name, plan.dp_size, plan.slo_scale)

    def job(policy: str, trace: list[TraceRequest], scale: float, slos: dict[str, Slo]) -> Job:
        return Job(preset_name, policy, trace, scale, slos, plan.instances, plan.dp_size, plan.seed)

    lo, hi = (capacity.rate_scale_for(f) for f in plan.rate_range)
    searches = list(
        pool.map(
            search_rate,
            [job(p, steady, 1.0, slos) for p in plan.rate_policies],
            [lo] * len(plan.rate_policies),
            [hi] * len(plan.rate_policies),
            [plan.bisection_steps] * len(plan.rate_policies),
        )
    )
    rates = {s["policy"]: s for s in searches}
    reference = max(rates, key=lambda p: rates[p]["scale"])
    ref_scale = rates[reference]["scale"]
    ref_from = preset_name
    if shared_reference is not None:
        reference, ref_scale, ref_from = (shared_reference[k] for k in ("policy", "scale", "preset"))
    case: dict[str, Any] = {
        "capacity": capacity.as_dict(),
        "slos": {name: slo.as_dict() for name, slo in slos.items()},
        "requests": len(steady),
        "max_sustainable": {
            p: {
                "scale": s["scale"],
                "rps": request_rate(steady, s["scale"]) if s["scale"] else 0.0,
                "probes": s["probes"],
            }
            for p, s in rates.items()
        },
        "reference": {"policy": reference, "scale": ref_scale, "preset": ref_from},
        "steady": {},
        "transient": {},
    }
    if ref_scale > 0:
        jobs = [job(p, steady, f * ref_scale, slos) for f in STEADY_LOADS for p in plan.policies]
        runs = list(pool.map(run_job, jobs))
        n = len(plan.policies)
        for i, f in enumerate(STEADY_LOADS):
            rows = {r["policy"]: r for r in runs[i * n : (i + 1) * n]}
            case["steady"][str(f)] = {"scale": f * ref_scale, "rps": request_rate(steady, f * ref_scale), "rows": rows}
    slices = []
    for k in range(plan.transient_slices):
        piece = transform(window(full, k * plan.transient_minutes * 60, plan.transient_minutes * 60))
        scale = cluster_load(piece, engine, plan.instances, plan.dp_size).rate_scale_for(TRANSIENT_LOAD)
        slices.append((piece, scale, named_slos(piece, preset_name, plan.dp_size, plan.slo_scale)))
    jobs = [job(p, piece, scale, s) for piece, scale, s in slices for p in plan.policies]
    runs = list(pool.map(run_job, jobs))
    n = len(plan.policies)
    case["transient"] = {
        "slices": [
            {
                "start_min": k * plan.transient_minutes,
                "scale": slices[k][1],
                "rows": {r["policy"]: r for r in runs[k * n : (k + 1) * n]},
            }
            for k in range(len(slices))
        ]
    }
    return case


def evaluate(
    plan: Plan,
    pool: Executor,
    load: Callable[[str], list[TraceRequest]] | None = None,
    on_case: Callable[[dict[str, Any]], None] | None = None,
    reuse: Iterable[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Every case of ``plan``: ``{"plan", "presets": {name: settings}, "cases": {preset: {trace: {mode: case}}}}``.

    Args:
        pool: where the simulations run (a process pool, or any executor).
        load: trace name → its requests (default: the bundled trace).
        on_case: called with the report so far after each case (to write partial results).
        reuse: earlier reports whose cases are taken as they are where the report's plan (presets aside) and the
            preset's settings equal this one's (:func:`reusable`; the first such report wins); their names go in
            ``report["reused"]``.
    """
    loader = load or (lambda name: load_trace(resolve_trace(name)))
    report: dict[str, Any] = {
        "plan": asdict(plan),
        "presets": {name: preset(name, plan.dp_size).settings() for name in plan.presets},
        "cases": {},
    }
    report["reused"] = []
    earlier = list(reuse)
    for name in plan.presets:
        for trace_name in plan.traces:
            for mode in plan.modes:
                case = next(
                    (c for c in (reusable(e, report, name, trace_name, mode) for e in earlier) if c is not None), None
                )
                plain = report["cases"].get(name.removesuffix("-aligned"), {}).get(trace_name, {}).get(mode)
                shared = None
                if name.endswith("-aligned") and plain is not None:
                    shared = plain["reference"] | {"preset": name.removesuffix("-aligned")}
                if case is not None:
                    report["reused"].append(f"{name} {trace_name} {mode}")
                else:
                    case = evaluate_case(plan, name, trace_name, mode, pool, loader, shared)
                report["cases"].setdefault(name, {}).setdefault(trace_name, {})[mode] = case
                print(f"{name} {trace_name} {mode}: reference {case['reference']}", file=sys.stderr)
                if on_case is not None:
                    on_case(report)
    return report


def reusable(
    earlier: dict[str, Any], report: dict[str, Any], name: str, trace: str, mode: str
) -> dict[str, Any] | None:
    """``earlier``'s case for ``name``, ``trace`` and ``mode`` if it ran the same plan (presets aside) and the
    preset had the same settings, else ``None``."""
    plan = {k: v for k, v in report["plan"].items() if k != "presets"}
    then = {k: v for k, v in earlier["plan"].items() if k != "presets"}
    same = json.loads(json.dumps(plan)) == then and earlier["presets"].get(name) == json.loads(
        json.dumps(report["presets"][name])
    )
    case: dict[str, Any] | None = earlier["cases"].get(name, {}).get(trace, {}).get(mode)
    return case if same else None


def ms(x: float | None) -> str:
    return "–" if x is None else f"{x * 1000:,.0f}"


def pct(x: float) -> str:
    return f"{x:+.0%}"


def spread(d: list[float]) -> str:
    return f"{pct(statistics.fmean(d))} [{pct(min(d))}, {pct(max(d))}]" if d else "–"


def policy_table(rows: dict[str, dict[str, Any]], slo_names: Iterable[str], steady_column: bool) -> list[str]:
    names = list(slo_names)
    head = "| policy | TTFT mean | p99 (ms) | TPOT mean | p99 (ms) | " + " | ".join(f"goodput {n}" for n in names)
    out = [head + (" | backlog growth / allowed |" if steady_column else " |")]
    out.append("|---|" + "---:|" * (4 + len(names) + steady_column))
    for policy, r in rows.items():
        t, p = r["ttft_s"], r["tpot_s"]
        cells = [f"{r['goodput'][n]['goodput_rps']:.2f} ({r['goodput'][n]['slo_attainment']:.0%})" for n in names]
        line = f"| {policy} | {ms(t['mean'])} | {ms(t['p99'])} | {ms(p['mean'])} | {ms(p['p99'])} | " + " | ".join(
            cells
        )
        if steady_column:
            s = r["steadiness"]
            line += f" | {s['growth']:.0f} / {s['allowed']:.0f}{'' if s['steady'] else ' (grows)'}"
        out.append(line + " |")
    return out


def sbs_line(rows: dict[str, dict[str, Any]], fifth_deltas: dict[str, list[float]], label: str) -> str:
    parts = []
    for figure in ("mean", "p99"):
        other = best_ttft(rows, figure)
        delta = rows["sbs"]["ttft_s"][figure] / rows[other]["ttft_s"][figure] - 1
        parts.append(f"TTFT {figure} {pct(delta)} against {other}; {label}: {spread(fifth_deltas[figure])}")
    return "sbs: " + "; ".join(parts) + "."


def markdown(report: dict[str, Any], command: str) -> list[str]:
    """The report as Markdown lines."""
    plan = report["plan"]
    steady_len = (
        "the whole trace" if plan["steady_minutes"] is None else f"the first {plan['steady_minutes']:g} minutes"
    )
    md = [
        "# Evaluation: steady state, transients, prefill-only, fixed and derived SLOs",
        "",
        f"Made by `{command}` ({plan['instances']} instances x {plan['dp_size']} DP ranks, virtual time, seed "
        f"{plan['seed']}; `bench/evaluate.py`'s docstring defines every figure). Steady state: {steady_len} of each "
        f"trace at {', '.join(f'{f:.0%}' for f in STEADY_LOADS)} of the best baseline's maximum sustainable rate "
        "(`gateway.sim.steady_state`: no backlog growth over the second half and 90% of requests within the derived "
        f"SLO; geometric bisection over {plan['rate_range'][0]:.0%}-{plan['rate_range'][1]:.0%} of the analytic "
        "capacity, "
        f"{plan['bisection_steps']} steps, baselines {', '.join(plan['rate_policies'])}). Transients: "
        f"{plan['transient_slices']} consecutive {plan['transient_minutes']:g}-minute slices at "
        f"{TRANSIENT_LOAD:.0%} of each slice's analytic capacity. Goodput in req/s with the share of requests "
        "meeting the SLO in brackets. Five slices per figure: fifths of the steady run by arrival, or the "
        "transient slices; the spread is sbs against the best baseline per slice, mean [min, max].",
        "",
        "## Presets",
        "",
    ]
    if report.get("reused"):
        md[-2:-2] = [
            f"Cases taken from an earlier run of the same plan and preset settings: {', '.join(report['reused'])}.",
            "",
        ]
    for name in report["presets"]:
        md += [f"- `{name}`: {preset(name, plan['dp_size']).describe()}"]
    md += ["", "Every setting of each preset is in the JSON (`presets`).", ""]
    md += summary(report, OWN_FORMS)
    md += ["", *summary(report)]
    md += alignment(report)
    for name, traces in report["cases"].items():
        md += ["", f"## Preset `{name}`" + (" (headline)" if name == plan["presets"][0] else " (labelled column)")]
        for trace_name, modes in traces.items():
            for mode, case in modes.items():
                md += ["", f"### {trace_name}, {mode}", ""]
                slos = case["slos"]
                d = slos["derived"]
                md.append(
                    f"{case['requests']:,} requests in the steady run; analytic capacity "
                    f"{case['capacity']['capacity_rps']:.2f} req/s. Derived SLO: TTFT <= {d['ttft_s']:.2f} s + "
                    f"{d['ttft_per_unloaded']:g} x unloaded TTFT, TPOT <= {d['tpot_s'] * 1000:,.0f} ms."
                )
                rates = case["max_sustainable"]
                ref = case["reference"]
                ref_text = f"reference {ref['policy']}"
                if ref.get("preset", name) != name:
                    ref_text += f" of `{ref['preset']}` (the same traffic, the engine's own alignment off)"
                md += [
                    "",
                    "Maximum sustainable rate: "
                    + ", ".join(f"{p} {r['rps']:.2f} req/s (x{r['scale']:.2f})" for p, r in rates.items())
                    + f"; {ref_text}.",
                ]
                if not case["steady"]:
                    md += ["", "No baseline is sustainable at the bottom of the search range: no steady-state runs."]
                for load, entry in case["steady"].items():
                    rows = entry["rows"]
                    md += ["", f"Steady state at {float(load):.0%} of the reference ({entry['rps']:.2f} req/s):", ""]
                    md += policy_table(rows, slos, steady_column=True)
                    if "sbs" in rows and len(rows) > 1:
                        fd = {f: deltas_per_fifth(rows, f) for f in ("mean", "p99")}
                        md += ["", sbs_line(rows, fd, "per fifth")]
                pieces = case["transient"]["slices"]
                if pieces:
                    pooled = pooled_rows(pieces)
                    md += ["", f"Transients ({len(pieces)} slices; TTFT and TPOT means over the slices):", ""]
                    md += policy_table(pooled, slos, steady_column=False)
                    if "sbs" in pooled and len(pooled) > 1:
                        per_slice = {f: transient_deltas(pieces, f) for f in ("mean", "p99")}
                        md += ["", sbs_line(pooled, per_slice, "per slice")]
    return md


def summary(report: dict[str, Any], exclude: tuple[str, ...] = ("sbs",)) -> list[str]:
    """One table over every case: sbs's TTFT mean and p99 against the best baseline for that figure (not counting
    ``exclude``) at each steady load (mean over the fifths [min, max]) and in the transients (per slice); goodput
    is in the detail."""
    peers = exclude != ("sbs",)
    md = [
        "## Summary: sbs against the best peer policy per figure (phase_aware, its own cost without a window, left out)"
        if peers
        else "## Summary: sbs against the best baseline per figure (phase_aware included)",
        "",
        "Each cell: sbs's TTFT over the best baseline's for that figure, minus 1 (negative: sbs is faster), pooled "
        "over the run, then the per-slice mean [min, max] in brackets. Steady loads are fractions of the reference "
        f"rate; transients are the {report['plan']['transient_minutes']:g}-minute slices at {TRANSIENT_LOAD:.0%} of "
        "their analytic capacity.",
        "",
        "| preset | trace | mode | load | TTFT mean | TTFT p99 | best baseline (mean / p99) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, traces in report["cases"].items():
        for trace_name, modes in traces.items():
            for mode, case in modes.items():
                entries = [(f"{float(load):.0%}", e["rows"], True) for load, e in case["steady"].items()]
                pieces = case["transient"]["slices"]
                if pieces:
                    entries.append(("transient", pooled_rows(pieces), False))
                for label, rows, steady in entries:
                    if "sbs" not in rows or len(rows) < 2:
                        continue
                    cells, best = [], []
                    for figure in ("mean", "p99"):
                        other = best_ttft(rows, figure, exclude)
                        best.append(other)
                        pooled = rows["sbs"]["ttft_s"][figure] / rows[other]["ttft_s"][figure] - 1
                        per = (
                            deltas_per_fifth(rows, figure, exclude)
                            if steady
                            else transient_deltas(pieces, figure, exclude)
                        )
                        cells.append(f"{pct(pooled)} ({spread(per)})")
                    row = [name, trace_name, mode, label, *cells, " / ".join(best)]
                    md.append("| " + " | ".join(row) + " |")
    return md


def alignment(report: dict[str, Any]) -> list[str]:
    """Each plain realistic preset against its ``-aligned`` twin on the same traffic: the best baseline and sbs, with
    the engine's own prefill alignment off and on, at each steady load (TTFT mean / p99 and TPOT mean, ms)."""
    md: list[str] = []
    for name in report["cases"]:
        twin = report["cases"].get(f"{name}-aligned")
        if twin is None:
            continue
        md += [
            "",
            f"## The engine's own alignment: `{name}` against `{name}-aligned`, the same traffic",
            "",
            "Best baseline = the lowest TTFT mean among the baselines in that run. TTFT mean / p99, TPOT mean, ms.",
            "",
            "| trace | mode | load | best baseline, off | best baseline, on | sbs, off | sbs, on |",
            "|---|---|---|---|---|---|---|",
        ]
        for trace_name, modes in report["cases"][name].items():
            for mode, case in modes.items():
                other = twin.get(trace_name, {}).get(mode)
                if other is None:
                    continue
                for load, entry in case["steady"].items():
                    twin_entry = other["steady"].get(load)
                    if twin_entry is None:
                        continue
                    cells = []
                    for rows in (entry["rows"], twin_entry["rows"]):
                        best = best_ttft(rows, "mean")
                        cells.append(f"{best} {figures(rows[best])}")
                    cells += [figures(entry["rows"]["sbs"]), figures(twin_entry["rows"]["sbs"])]
                    md.append(f"| {trace_name} | {mode} | {float(load):.0%} | " + " | ".join(cells) + " |")
    return md


def figures(row: dict[str, Any]) -> str:
    """``TTFT mean / p99, TPOT mean`` of one row, ms."""
    t, p = row["ttft_s"], row["tpot_s"]
    return f"{ms(t['mean'])} / {ms(t['p99'])}, {ms(p['mean'])}"


def mean_of(values: list[float | None]) -> float | None:
    """The mean of the values that are not ``None`` (``None`` if none is)."""
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def pooled_rows(pieces: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each policy's figures averaged over the transient slices (TTFT, TPOT, goodput)."""
    out: dict[str, dict[str, Any]] = {}
    for policy in pieces[0]["rows"]:
        runs = [p["rows"][policy] for p in pieces]

        out[policy] = {
            "ttft_s": {f: mean_of([r["ttft_s"][f] for r in runs]) for f in ("mean", "p99")},
            "tpot_s": {f: mean_of([r["tpot_s"][f] for r in runs]) for f in ("mean", "p99")},
            "goodput": {
                n: {k: mean_of([r["goodput"][n][k] for r in runs]) for k in ("goodput_rps", "slo_attainment")}
                for n in runs[0]["goodput"]
            },
        }
    return out


def transient_deltas(pieces: list[dict[str, Any]], figure: str, exclude: tuple[str, ...] = ("sbs",)) -> list[float]:
    out = []
    for piece in pieces:
        rows = piece["rows"]
        other = best_ttft(rows, figure, exclude)
        out.append(rows["sbs"]["ttft_s"][figure] / rows[other]["ttft_s"][figure] - 1)
    return out


def runs_in(report: dict[str, Any]) -> tuple[int, float]:
    """How many simulations the report ran and their summed wall time, seconds (the rate searches' runs counted,
    their time not)."""
    count, wall = 0, 0.0
    for traces in report["cases"].values():
        for modes in traces.values():
            for case in modes.values():
                count += sum(len(r["probes"]) for r in case["max_sustainable"].values())
                for entry in case["steady"].values():
                    count += len(entry["rows"])
                    wall += sum(r["wall_s"] for r in entry["rows"].values())
                for piece in case["transient"]["slices"]:
                    count += len(piece["rows"])
                    wall += sum(r["wall_s"] for r in piece["rows"].values())
    return count, wall


def parse_list(name: str, value: str) -> tuple[str, ...]:
    """A comma-separated option; ``all`` for ``--policies`` / ``--rate-policies`` is every registered policy
    (every baseline for the rate search)."""
    if value == "all" and name == "policies":
        return tuple(get_args(PolicyName))
    if value == "all" and name == "rate_policies":
        return tuple(p for p in get_args(PolicyName) if p != "sbs")
    return tuple(value.split(","))


def write(output: Path, report: dict[str, Any], command: str, footer: str) -> None:
    """``report`` as ``output``.json and its Markdown as ``output``.md."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(report, indent=2))
    output.with_suffix(".md").write_text("\n".join([*markdown(report, command), "", footer]) + "\n")


def without(argv: list[str], *options: str) -> list[str]:
    """The command line without ``options`` and their values (the report's command is the one that regenerates
    it, whatever it reused; where an earlier run wrote its report is not part of how it ran)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in options)):
            out.append(arg)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke test: two presets, one trace, three policies")
    ap.add_argument("--jobs", type=int, default=1, help="simulations run in parallel processes [1]")
    ap.add_argument(
        "--presets", help=f"comma-separated, of {', '.join(PRESET_NAMES)} [Plan.presets; the first is the headline]"
    )
    ap.add_argument("--traces", help=f"comma-separated [{','.join(TRACES)}]")
    ap.add_argument("--policies", help="comma-separated, or all [REPORT_POLICIES]")
    ap.add_argument("--rate-policies", help="baselines whose sustainable rate is searched, or all [Plan.rate_policies]")
    ap.add_argument("--steady-minutes", type=float, help="steady-state run length, minutes; 0 = the whole trace [20]")
    ap.add_argument("--bisection-steps", type=int, help="bisections of each rate search [5; --quick: 2]")
    ap.add_argument(
        "--output", type=Path, help="path without suffix [evaluation, or evaluation_quick, in bench/results/]"
    )
    ap.add_argument(
        "--render",
        action="store_true",
        help="only write the Markdown again from the report's JSON (``--output``), running nothing",
    )
    ap.add_argument(
        "--reuse",
        type=Path,
        action="append",
        default=[],
        help="an earlier report (JSON; repeatable, the first match wins) whose cases are kept where the plan and "
        "the preset's settings are the same (an interrupted run resumes, or separate runs make one report; a "
        "preset whose engine model changed in a way its settings do not show must not be reused)",
    )
    args = ap.parse_args()
    plan = QUICK if args.quick else Plan()
    lists: dict[str, Any] = {n: parse_list(n, getattr(args, n)) for n in LIST_OPTIONS if getattr(args, n)}
    plan = replace(plan, **lists)
    if args.steady_minutes is not None:
        plan = replace(plan, steady_minutes=args.steady_minutes or None)
    if args.bisection_steps is not None:
        plan = replace(plan, bisection_steps=args.bisection_steps)
    output = args.output or RESULTS / ("evaluation_quick" if args.quick else "evaluation")
    if args.render:
        report = json.loads(output.with_suffix(".json").read_text())
        footer = report.get(
            "footer", f"Generated in {report['elapsed_s']:.0f} s ({report['simulations']} simulations)."
        )
        write(output, report, report.get("command", "python bench/evaluate.py"), footer)
        return
    command = " ".join(["python bench/evaluate.py", *without(sys.argv[1:], "--reuse")])
    started = time.perf_counter()

    def partial(report: dict[str, Any]) -> None:
        write(output, report, command, f"Partial: {time.perf_counter() - started:.0f} s so far, still running.")

    reuse = [json.loads(path.read_text()) for path in args.reuse]
    with ProcessPoolExecutor(args.jobs) as pool:
        report = evaluate(plan, pool, on_case=partial, reuse=reuse)
    elapsed = time.perf_counter() - started
    count, wall = runs_in(report)
    report["elapsed_s"] = elapsed
    report["simulations"] = count
    report["command"] = command
    footer = f"Generated in {elapsed:.0f} s ({count} simulations, {args.jobs} in parallel)."
    if report["reused"]:
        earlier = "; ".join(
            f"`{' '.join(without(e.get('command', str(p)).split(), '--reuse', '--output'))}` "
            f"({e.get('elapsed_s', 0):.0f} s)"
            for p, e in zip(args.reuse, reuse, strict=True)
        )
        footer += f" The reused cases came from earlier runs of the same code: {earlier}; the count includes them."
    report["footer"] = footer
    write(output, report, command, footer)
    print(f"wrote {output}.md ({elapsed:.0f} s, {count} simulations, {wall:.0f} s of load runs)", file=sys.stderr)


if __name__ == "__main__":
    main()
