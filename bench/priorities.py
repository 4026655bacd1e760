"""Priorities and tenants inside the window (issue 17, part 3): an interactive tenant's TTFT while a batch tenant
floods the gateway, with and without priority classes, and the share two tenants of one class get under overload.

**Simulator** (``--part sim``). The cluster is ``evaluation.md``'s (2 instances x 8 DP ranks, preset
``realistic-sglang``, policy ``sbs``). Loads are fractions of the *capacity*: the sustainable rate
``bench/results/evaluation.json`` found for this preset on Azure conversation (its reference scale), as a fraction of
the cluster's analytic capacity (``gateway.sim.capacity``). The flood workload (``gateway.sim.tenants``):

- the interactive tenant: Azure conversation from its start, at ``--interactive-load`` of the capacity (0.6);
- the batch tenant: Azure code from its start (long prompts, short answers: summarisation-like batch work), at
  ``--flood-factor`` (2.5) times the rest of the capacity, i.e. 1.0 of it: the cluster is offered 160%.

Rows: ``interactive alone`` (the floor: the batch tenant absent), ``no priorities`` (both tenants, no ``tenants``
section: what main does), ``priorities`` (the ``tenants`` section: interactive in class ``interactive``, batch in
``batch``). Reported: the interactive tenant's TTFT mean, p50 and p99, with the spread over the run's fifths (the
interactive requests by arrival in five equal parts, each fifth's TTFT mean against the same fifth of ``no
priorities``: mean [min, max]), and the batch tenant's throughput while the arrivals last (requests and prompt plus
output tokens completed per second in ``[0, duration]``) and when its backlog was done. The simulator has no queue
timeout: batch requests that would get 503 ``queue_timeout`` after 60 s on a live gateway wait until served.

Fair sharing between two tenants of one class (``fairness`` rows): a ``light`` tenant (Azure conversation at 0.4 of the
capacity) and a ``heavy`` one (Azure code at 2.5 x 0.6 = 1.5), both ``standard``: the virtual token counter
(``tenants.fairness: vtc``) against arrival order (``none``) and no tenants.

**Over HTTP** (``--part http``): the same shape, scaled to this machine: two SGLang-flavoured simulated engines
(``gateway mock-engine``, 4 DP ranks each, the as-shipped engine model at ``--speed``; SGLang's because smg reads
an engine's DP size from its ``GET /server_info``), the two tenants replayed at once, each with its own key:

- ``gateway``: ``gateway serve`` (``sbs``) with both keys as flat API keys (no ``tenants`` section: main's behaviour);
- ``gateway+tenants``: the same with the ``tenants`` section (interactive and batch classes);
- ``smg``: the SGLang Model Gateway 1.13 (PyPI ``smg`` in ``bench/.venv-smg``, as ``bench/dataplane.py`` makes it),
  ``--dp-aware`` with its default policy;
- ``smg+priority``: the same with its priority admission scheduler (``--priority-scheduler-enabled``; each request
  sends ``x-smg-priority: interactive`` or ``bulk``, the classes of smg's ``middleware/scheduler/class.rs``).

and the same traces through the simulator's code on the same cluster and engine model in engine time, to show the
two agree (the conversion of ``bench/frontdoors_http.py``). The engines report ``max_running_requests`` in
``/server_info`` as SGLang does (:data:`SERVER_INFO_MAX_RUNNING`), so smg's priority scheduler derives the capacity
it would against SGLang as shipped and queues under the flood.

``--slices N`` runs every row on N time slices of the traces (:func:`sources`), for the spread of each figure.

    nice -n 10 .venv/bin/python bench/priorities.py --part sim --slices 3     # bench/results/priorities.{md,json}
    nice -n 10 .venv/bin/python bench/priorities.py --part http --http-seconds 90 --slices 3    # the HTTP rows
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import yaml
from _harness import Processes, peer_venv
from pydantic import SecretStr

from gateway.config import ScrapeConfig, TenantConfig, TenantsConfig, WindowConfig
from gateway.replay.client import replay
from gateway.sim.capacity import cluster_load
from gateway.sim.cluster import free_port
from gateway.sim.presets import preset
from gateway.sim.simulate import SimConfig, SimResult, simulate
from gateway.sim.tenants import BATCH, INTERACTIVE, flood_tenants, flood_workload, merge, tag
from gateway.workload.stats import distribution
from gateway.workload.traces import TraceRequest, load_trace, rescale, resolve_trace, window

RESULTS = Path(__file__).parent / "results"
FIFTHS = 5
STEADY_MINUTES = 20.0
"""Run length of ``evaluation.json``'s steady cases, whose reference rate sets the capacity."""


@dataclass(frozen=True)
class Plan:
    """What the simulator part covers (module docstring)."""

    preset: str = "realistic-sglang"
    instances: int = 2
    dp_size: int = 8
    duration_s: float = 180.0
    interactive_load: float = 0.6
    flood_factor: float = 2.5
    light_load: float = 0.4
    seed: int = 0


def capacity_fraction(plan: Plan) -> tuple[float, str]:
    """The sustainable share of the analytic capacity, and where it came from (``evaluation.json``'s reference scale
    for the preset on Azure conversation, times the trace's own analytic load)."""
    conv = window(load_trace(resolve_trace("azure-conv")), 0.0, STEADY_MINUTES * 60)
    engine = preset(plan.preset, plan.dp_size).engine
    own = cluster_load(conv, engine, plan.instances, plan.dp_size).load
    reference = json.loads((RESULTS / "evaluation.json").read_text())["cases"][plan.preset]["azure-conv"]["unified"]
    scale = float(reference["reference"]["scale"])
    return scale * own, f"evaluation.json reference scale {scale:.3f} ({reference['reference']['policy']})"


SLICE_SHIFT_S = 300.0
"""How far apart the time slices start in the Azure traces, seconds of trace time (``--slices``)."""


def sources(slice_index: int = 0) -> tuple[list[TraceRequest], list[TraceRequest]]:
    """The two tenants' source traces of time slice ``slice_index``, each from ``slice_index * SLICE_SHIFT_S`` on
    (re-based to 0 s): :data:`STEADY_MINUTES` of Azure conversation and the rest of Azure code; slice 0 is the
    traces from their start."""
    start = slice_index * SLICE_SHIFT_S
    conv = window(load_trace(resolve_trace("azure-conv")), start, STEADY_MINUTES * 60)
    return conv, window(load_trace(resolve_trace("azure-code")), start)


def workloads(plan: Plan, capacity: float, slice_index: int = 0) -> dict[str, list[TraceRequest]]:
    """The traces of the simulator part in time slice ``slice_index`` (:func:`sources`): the flood workload, the
    interactive tenant alone, and the two tenants of one class."""
    conv, code = sources(slice_index)
    engine = preset(plan.preset, plan.dp_size).engine
    flood = flood_workload(
        conv,
        code,
        engine,
        plan.instances,
        plan.dp_size,
        duration_s=plan.duration_s,
        capacity=capacity,
        interactive_load=plan.interactive_load,
        flood_factor=plan.flood_factor,
    )
    same = flood_workload(
        conv,
        code,
        engine,
        plan.instances,
        plan.dp_size,
        duration_s=plan.duration_s,
        capacity=capacity,
        interactive_load=plan.light_load,
        flood_factor=plan.flood_factor,
    )
    light = tag([r for r in same.trace if r.tenant == INTERACTIVE], "light", 1)
    heavy = tag([r for r in same.trace if r.tenant == BATCH], "heavy", 1)
    return {
        "flood": flood.trace,
        "alone": [r for r in flood.trace if r.tenant == INTERACTIVE],
        "same_class": merge(light, heavy),
    }


def same_class_tenants(fairness: str) -> TenantsConfig:
    return TenantsConfig(
        fairness=fairness,  # type: ignore[arg-type]
        tenants=[TenantConfig(name="light", priority="standard"), TenantConfig(name="heavy", priority="standard")],
    )


ROWS: dict[str, tuple[str, TenantsConfig | None]] = {
    "interactive alone": ("alone", None),
    "no priorities": ("flood", None),
    "priorities": ("flood", flood_tenants("vtc")),
    "fairness: no tenants": ("same_class", None),
    "fairness: arrival order": ("same_class", same_class_tenants("none")),
    "fairness: vtc": ("same_class", same_class_tenants("vtc")),
}


def tenant_figures(result: SimResult, trace: list[TraceRequest], duration_s: float) -> dict[str, Any]:
    """Per tenant: TTFT distribution, per-fifth TTFT means, throughput while arrivals last, when its last request
    ended."""
    out: dict[str, Any] = {}
    for tenant in sorted({r.tenant for r in trace}):
        pairs = [(rec, req) for rec, req in zip(result.records, trace, strict=True) if req.tenant == tenant]
        ttft = [rec.ttft_s for rec, _ in pairs if rec.first_token_s is not None]
        size = len(pairs) / FIFTHS
        fifths = []
        for i in range(FIFTHS):
            part = [rec.ttft_s for rec, _ in pairs[round(i * size) : round((i + 1) * size)] if rec.first_token_s]
            fifths.append(statistics.fmean(part) if part else None)
        inside = [(rec, req) for rec, req in pairs if rec.done_s is not None and rec.done_s <= duration_s]
        out[tenant] = {
            "requests": len(pairs),
            "ttft_s": distribution(ttft),
            "fifths_ttft_mean_s": fifths,
            "done_in_window_rps": len(inside) / duration_s,
            "done_in_window_tok_s": sum(req.prompt_tokens + req.output_tokens for _, req in inside) / duration_s,
            "offered_tok_s": sum(req.prompt_tokens + req.output_tokens for _, req in pairs) / duration_s,
            "last_done_s": max((rec.done_s for rec, _ in pairs if rec.done_s is not None), default=None),
        }
    return out


def run_row(job: tuple[Plan, str, list[TraceRequest], TenantsConfig | None]) -> dict[str, Any]:
    plan, name, trace, tenants = job
    started = time.perf_counter()
    config = preset(plan.preset, plan.dp_size).apply(
        SimConfig(policy="sbs", instances=plan.instances, dp_size=plan.dp_size, seed=plan.seed, tenants=tenants)
    )
    result = simulate(trace, config)
    return {
        "row": name,
        "tenants": tenant_figures(result, trace, plan.duration_s),
        "wall_s": time.perf_counter() - started,
    }


def sim_part(plan: Plan, jobs: int, slices: int) -> dict[str, Any]:
    """Every row of :data:`ROWS` in each of ``slices`` time slices; ``rows`` is slice 0's, ``slices`` all of
    them."""
    capacity, source = capacity_fraction(plan)
    per_slice = []
    for index in range(slices):
        traces = workloads(plan, capacity, index)
        todo = [(plan, name, traces[trace], tenants) for name, (trace, tenants) in ROWS.items()]
        with ProcessPoolExecutor(jobs) as pool:
            per_slice.append({row["row"]: row for row in pool.map(run_row, todo)})
        print(f"sim slice {index} done", file=sys.stderr)
    return {"capacity_of_analytic": capacity, "capacity_from": source, "rows": per_slice[0], "slices": per_slice}


# -- over HTTP ------------------------------------------------------------------------------------------------


HTTP_KEYS = {INTERACTIVE: "sk-interactive", BATCH: "sk-batch"}


def http_tenants() -> TenantsConfig:
    return TenantsConfig(
        tenants=[
            TenantConfig(name=INTERACTIVE, api_keys=[SecretStr(HTTP_KEYS[INTERACTIVE])], priority="interactive"),
            TenantConfig(name=BATCH, api_keys=[SecretStr(HTTP_KEYS[BATCH])], priority="batch"),
        ]
    )


def http_workload(args: argparse.Namespace, slice_index: int = 0) -> list[TraceRequest]:
    """The flood workload on the HTTP cluster in time slice ``slice_index``, in engine time, at loads of its
    analytic capacity times ``--http-capacity``."""
    conv, code = sources(slice_index)
    engine = preset("realistic-sglang", args.http_dp).engine
    return flood_workload(
        conv,
        code,
        engine,
        args.http_instances,
        args.http_dp,
        duration_s=args.http_seconds * args.speed,
        capacity=args.http_capacity,
        interactive_load=args.interactive_load,
        flood_factor=args.flood_factor,
    ).trace


SMG_VENV = Path(__file__).parent / ".venv-smg"
SMG_PACKAGE = "smg==1.13.*"
"""The release issue 16 measured against (``bench/dataplane.py``)."""
SMG_CLASSES = {INTERACTIVE: "interactive", BATCH: "bulk"}
"""The ``x-smg-priority`` value each tenant sends to smg (smg 1.13 ``middleware/scheduler/class.rs``)."""
FRONTS = ("gateway", "gateway+tenants", "smg", "smg+priority")


def start_gateway_front(procs: Processes, engines: list[dict[str, Any]], tenants: bool) -> str:
    port = free_port()
    settings: dict[str, Any] = {"policy": "sbs", "engines": engines, "security": {"api_keys": list(HTTP_KEYS.values())}}
    if tenants:
        settings["security"] = {}
        settings["tenants"] = json.loads(http_tenants().model_dump_json())
        for entry, key in zip(settings["tenants"]["tenants"], HTTP_KEYS.values(), strict=True):
            entry["api_keys"] = [key]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(settings, f)
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", f.name, "--port", str(port), "--log-level", "warning"]
    return procs.start(cmd, f"http://127.0.0.1:{port}", "/ready")


SERVER_INFO_MAX_RUNNING = "sglang"
"""The simulated engines report ``max_running_requests`` in ``/server_info`` as SGLang does (``gateway mock-engine
--server-info-max-running sglang``): the ``--max-running-requests`` flag, which this bench leaves unset as the
as-shipped profile does, so ``null``; each rank's cap (2,048, from the KV size) under ``internal_states``."""


def start_http_engines(procs: Processes, args: argparse.Namespace) -> list[dict[str, Any]]:
    """``--http-instances`` SGLang-flavoured simulated engines (as-shipped, ``--http-dp`` ranks, ``--speed``) that
    report ``max_running_requests`` as SGLang does (:data:`SERVER_INFO_MAX_RUNNING`); their gateway
    configurations."""
    engines = []
    for i in range(args.http_instances):
        port = free_port()
        cmd = [sys.executable, "-m", "gateway", "mock-engine", "--flavor", "sglang", "--dp-size", str(args.http_dp)]
        cmd += ["--port", str(port), "--model", "m", "--speed", str(args.speed), "--profile", "as-shipped"]
        cmd += ["--server-info-max-running", SERVER_INFO_MAX_RUNNING]
        url = procs.start(cmd, f"http://127.0.0.1:{port}", "/health")
        engines.append({"name": f"sglang{i}", "flavor": "sglang", "url": url, "dp_size": args.http_dp, "models": ["m"]})
    return engines


def start_smg_front(procs: Processes, engines: list[dict[str, Any]], priority: bool) -> tuple[str, str]:
    """smg 1.13 in front of ``engines``, DP-aware with its default policy (``cache_aware``; on Azure traces, which
    share no prefixes, it places as its ``least_load``), with or without its priority admission scheduler (every
    tenant may ask for ``interactive``); its URL and its metrics URL."""
    port, metrics_port = free_port(), free_port()
    cmd = [str(peer_venv(SMG_VENV, SMG_PACKAGE) / "smg"), "launch", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--worker-urls", *(e["url"] for e in engines), "--dp-aware", "--disable-retries"]
    cmd += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]
    if priority:
        cmd += ["--priority-scheduler-enabled", "--priority-scheduler-default-max-class", "interactive"]
    url = procs.start(cmd, f"http://127.0.0.1:{port}", "/readiness")
    ranks = sum(e["dp_size"] for e in engines)
    deadline = time.monotonic() + 60  # workers register in the background after the port opens
    while httpx.get(url + "/readiness", timeout=5).json().get("healthy_workers", 0) < ranks:
        if time.monotonic() > deadline:
            raise RuntimeError(f"smg has fewer than {ranks} healthy DP-rank workers after 60 s")
        time.sleep(0.1)
    return url, f"http://127.0.0.1:{metrics_port}/metrics"


SMG_GAUGES = ("smg_scheduler_inflight", "smg_scheduler_queue_depth")
"""smg 1.13's scheduler gauges (``middleware/scheduler/metrics.rs``), per class; sampled for their peaks."""


class SmgSampler:
    """Polls smg's Prometheus metrics once a second while a replay runs: the peak over time of each of
    :data:`SMG_GAUGES` summed over the classes, the capacity smg admits to (in flight over
    ``smg_scheduler_utilization``) and the last sample's scheduler series."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.peaks = dict.fromkeys(SMG_GAUGES, 0.0)
        self.last: dict[str, float] = {}
        self.capacity: int | None = None
        self._stop = asyncio.Event()

    def sample(self, text: str) -> None:
        sums = dict.fromkeys(SMG_GAUGES, 0.0)
        last = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, _, value = line.rpartition(" ")
            base = name.split("{")[0]
            if base.startswith("smg_scheduler") or "capacity" in base:
                last[name] = float(value)
            if base in sums:
                sums[base] += float(value)
        for key, total in sums.items():
            self.peaks[key] = max(self.peaks[key], total)
        utilization = last.get("smg_scheduler_utilization", 0.0)
        if utilization > 0:  # in flight over the capacity (middleware/scheduler/metrics.rs)
            self.capacity = round(sums["smg_scheduler_inflight"] / utilization)
        self.last = last

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            while not self._stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    self.sample((await client.get(self.url)).text)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 1.0)

    def stop(self) -> None:
        self._stop.set()


def http_run(args: argparse.Namespace, trace: list[TraceRequest], front: str) -> dict[str, Any]:
    """Replay ``trace`` (engine time) through ``front`` (:data:`FRONTS`) before fresh engines, each tenant with its
    key (the gateway) or its class header (smg); per tenant, the replay's TTFT in engine seconds; for smg, its
    scheduler's peaks (:class:`SmgSampler`)."""
    wall = rescale(trace, args.speed)
    sampler: SmgSampler | None = None
    with Processes() as procs:
        engines = start_http_engines(procs, args)
        if front.startswith("smg"):
            url, metrics_url = start_smg_front(procs, engines, front == "smg+priority")
            sampler = SmgSampler(metrics_url)
        else:
            url = start_gateway_front(procs, engines, front == "gateway+tenants")

        async def both() -> list[Any]:
            watcher = asyncio.create_task(sampler.run()) if sampler is not None else None
            results = list(
                await asyncio.gather(
                    *(
                        replay(
                            url,
                            [r for r in wall if r.tenant == t],
                            model="m",
                            api_key=k,
                            progress=False,
                            headers={"x-smg-priority": SMG_CLASSES[t]} if front == "smg+priority" else None,
                        )
                        for t, k in HTTP_KEYS.items()
                    )
                )
            )
            if sampler is not None and watcher is not None:
                sampler.stop()
                await watcher
            return results

        results = asyncio.run(both())
    out: dict[str, Any] = {}
    for tenant, result in zip(HTTP_KEYS, results, strict=True):
        ok = [r for r in result.records if r.ok and r.ttft_s is not None]
        errors: dict[str, int] = {}
        for r in result.records:
            if not r.ok:
                errors[str(r.error)] = errors.get(str(r.error), 0) + 1
        done_in_window = [r for r in ok if r.done_at_s <= args.http_seconds]
        out[tenant] = {
            "requests": len(result.records),
            "failed": len(result.records) - len(ok),
            "errors": errors,
            "ttft_engine_s": distribution([r.ttft_s * args.speed for r in ok]),
            "completed_tok_s_engine": sum(r.prompt_tokens + (r.output_tokens or 0) for r in ok)
            / (args.http_seconds * args.speed),
            "done_in_window_tok_s_engine": sum(r.prompt_tokens + (r.output_tokens or 0) for r in done_in_window)
            / (args.http_seconds * args.speed),
            "last_done_engine_s": max((r.done_at_s for r in ok), default=0.0) * args.speed,
        }
    if sampler is not None:
        out["smg_scheduler"] = {"capacity": sampler.capacity, "peaks": sampler.peaks, "last": sampler.last}
    return out


def http_simulated(args: argparse.Namespace, trace: list[TraceRequest], tenants: bool) -> dict[str, Any]:
    """``trace`` through the simulator on the HTTP cluster, the gateway's wall-clock constants in engine time."""
    speed = args.speed
    window_defaults, scrape_defaults = WindowConfig(), ScrapeConfig()
    base = SimConfig(
        policy="sbs",
        instances=args.http_instances,
        dp_size=args.http_dp,
        window=window_defaults.model_copy(
            update={
                "min_interval_s": window_defaults.min_interval_s * speed,
                "max_interval_s": window_defaults.max_interval_s * speed,
                "initial_step_s": window_defaults.initial_step_s * speed,
            }
        ),
        scrape_interval_s=scrape_defaults.interval_s * speed,
        stale_after_s=scrape_defaults.stale_after_s * speed,
        tenants=http_tenants() if tenants else None,
    )
    config = replace(base, engine=preset("realistic-sglang", args.http_dp).engine)
    result = simulate(trace, config)
    out = {}
    for tenant in HTTP_KEYS:
        ttft = [
            rec.ttft_s
            for rec, req in zip(result.records, trace, strict=True)
            if req.tenant == tenant and rec.first_token_s is not None
        ]
        out[tenant] = {"ttft_engine_s": distribution(ttft)}
    return out


def http_part(args: argparse.Namespace) -> dict[str, Any]:
    """Every front of ``--fronts`` on each of ``--slices`` time slices (one run at a time), the gateway's also
    through the simulator; ``rows`` is slice 0's, ``slices`` all of them."""
    per_slice = []
    requests = []
    for index in range(args.slices):
        trace = http_workload(args, index)
        requests.append(len(trace))
        rows: dict[str, Any] = {}
        for front in args.fronts.split(","):
            rows[f"{front} (HTTP)"] = http_run(args, trace, front)
            print(f"slice {index} {front}: {json.dumps(rows[f'{front} (HTTP)'])[:600]}", file=sys.stderr)
            if front.startswith("gateway"):
                rows[f"{front} (simulator)"] = http_simulated(args, trace, front == "gateway+tenants")
        per_slice.append(rows)
    return {"requests": requests[0], "requests_per_slice": requests, "rows": per_slice[0], "slices": per_slice}


# -- report ---------------------------------------------------------------------------------------------------


def ms(x: float | None) -> str:
    return "–" if x is None else f"{x * 1000:,.0f}"


def pct(x: float) -> str:
    return f"{x:+.0%}"


def spread(row: dict[str, Any], base: dict[str, Any], tenant: str) -> str:
    a, b = row["tenants"][tenant]["fifths_ttft_mean_s"], base["tenants"][tenant]["fifths_ttft_mean_s"]
    d = [x / y - 1 for x, y in zip(a, b, strict=True) if x is not None and y]
    return f"{pct(statistics.fmean(d))} [{pct(min(d))}, {pct(max(d))}]" if d else "–"


def per_slice(values: list[float | None], fmt: Any = ms) -> str:
    """One figure in each time slice, slice 0 first: ``a / b / c``."""
    return " / ".join(fmt(v) for v in values)


def sim_slices(sim: dict[str, Any]) -> list[dict[str, Any]]:
    return list(sim.get("slices") or [sim["rows"]])


def render_sim(report: dict[str, Any]) -> list[str]:
    sim, plan = report["sim"], report["plan"]
    slices = sim_slices(sim)
    lines = [
        "## Simulator: an interactive tenant while a batch tenant floods",
        "",
        f"{plan['instances']} x {plan['dp_size']} DP ranks, preset `{plan['preset']}`, policy `sbs`, "
        f"{plan['duration_s']:.0f} s of arrivals. Capacity: {sim['capacity_of_analytic']:.3f} of the analytic "
        f"capacity ({sim['capacity_from']}). Interactive tenant: Azure conversation at "
        f"{plan['interactive_load']:.0%} of it; batch tenant: Azure code at {plan['flood_factor']} x the rest, "
        f"{plan['flood_factor'] * (1 - plan['interactive_load']):.0%} of it. {len(slices)} time slices of the "
        f"traces (starting {', '.join(f'{i * SLICE_SHIFT_S:.0f}' for i in range(len(slices)))} s into them): "
        "each cell gives slice 0 / 1 / 2.",
        "",
        "| row | interactive TTFT mean (ms) | p50 (ms) | p99 (ms) | batch tok/s done in window | batch backlog done "
        "at (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("interactive alone", "no priorities", "priorities"):
        t = [sl[name]["tenants"][INTERACTIVE]["ttft_s"] for sl in slices]
        b = [sl[name]["tenants"].get(BATCH) for sl in slices]
        batch = (
            ["–", "–"]
            if b[0] is None
            else [
                per_slice([x["done_in_window_tok_s"] for x in b], lambda v: f"{v:,.0f}"),
                per_slice([x["last_done_s"] for x in b], lambda v: f"{v:.0f}"),
            ]
        )
        lines.append(
            f"| {name} | {per_slice([x['mean'] for x in t])} | {per_slice([x['p50'] for x in t])} | "
            f"{per_slice([x['p99'] for x in t])} | " + " | ".join(batch) + " |"
        )
    lines += [
        "",
        "Per fifth of the run (slice 0), the interactive TTFT mean against the same fifth without priorities: "
        + "; ".join(
            f"{name} {spread(slices[0][name], slices[0]['no priorities'], INTERACTIVE)}"
            for name in ("interactive alone", "priorities")
        )
        + ".",
        "",
        "## Simulator: two tenants of one class under overload",
        "",
        f"`light`: Azure conversation at {plan['light_load']:.0%} of the capacity; `heavy`: Azure code at "
        f"{plan['flood_factor'] * (1 - plan['light_load']):.0%}; both `standard`. Slice 0 / 1 / 2.",
        "",
        "| row | light TTFT mean (ms) | p50 (ms) | p99 (ms) | light tok/s done | heavy tok/s done |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("fairness: no tenants", "fairness: arrival order", "fairness: vtc"):
        light = [sl[name]["tenants"]["light"] for sl in slices]
        heavy = [sl[name]["tenants"]["heavy"] for sl in slices]
        lines.append(
            f"| {name.removeprefix('fairness: ')} | {per_slice([x['ttft_s']['mean'] for x in light])} | "
            f"{per_slice([x['ttft_s']['p50'] for x in light])} | {per_slice([x['ttft_s']['p99'] for x in light])} | "
            f"{per_slice([x['done_in_window_tok_s'] for x in light], lambda v: f'{v:,.0f}')} | "
            f"{per_slice([x['done_in_window_tok_s'] for x in heavy], lambda v: f'{v:,.0f}')} |"
        )
    return lines


def render_http(http: dict[str, Any]) -> list[str]:
    slices = list(http.get("slices") or [http["rows"]])
    requests = http.get("requests_per_slice", [http["requests"]])
    lines = [
        "## Over HTTP against the simulated engines, and the simulator on the same cluster",
        "",
        f"{http['config']}. Requests per slice: {' / '.join(str(n) for n in requests)}. TTFT in engine seconds "
        "(wall times `--speed`); each cell gives slice 0 / 1 / 2. `batch tok/s done` counts the prompt and output "
        "tokens of the batch requests that ended within the arrivals, per engine second; `batch backlog done at` is "
        "when the last batch request ended, engine seconds from the start; `failed` counts requests "
        "that got no answer (interactive + batch); `smg queued (peak)` is the most requests smg's priority scheduler "
        "held at once (its `smg_scheduler_queue_depth`, summed over classes, sampled each second).",
        "",
        "| row | interactive TTFT mean (ms) | p99 (ms) | batch TTFT mean (ms) | p99 (ms) | batch tok/s done | batch "
        "backlog done at (s) | failed | smg queued (peak) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = [n for n in slices[0] if all(n in sl for sl in slices)]
    for name in names:
        rows = [sl[name] for sl in slices]
        i = [r[INTERACTIVE]["ttft_engine_s"] for r in rows]
        b = [r[BATCH]["ttft_engine_s"] for r in rows]
        http_row = "HTTP" in name
        done = (
            per_slice([r[BATCH].get("done_in_window_tok_s_engine") for r in rows], lambda v: f"{v:,.0f}")
            if http_row and all("done_in_window_tok_s_engine" in r[BATCH] for r in rows)
            else "–"
        )
        backlog = (
            per_slice([r[BATCH].get("last_done_engine_s") for r in rows], lambda v: f"{v:.0f}")
            if http_row and all("last_done_engine_s" in r[BATCH] for r in rows)
            else "–"
        )
        failed = (
            per_slice([float(sum(r[t].get("failed", 0) for t in HTTP_KEYS)) for r in rows], lambda v: f"{v:.0f}")
            if http_row
            else "–"
        )
        queued = (
            per_slice([r["smg_scheduler"]["peaks"]["smg_scheduler_queue_depth"] for r in rows], lambda v: f"{v:.0f}")
            if all("smg_scheduler" in r for r in rows)
            else "–"
        )
        lines.append(
            f"| {name} | {per_slice([x['mean'] for x in i])} | {per_slice([x['p99'] for x in i])} | "
            f"{per_slice([x['mean'] for x in b])} | {per_slice([x['p99'] for x in b])} | {done} | {backlog} | "
            f"{failed} | {queued} |"
        )
    return lines


def render(report: dict[str, Any]) -> str:
    lines = ["# Priorities and tenants inside the window", ""]
    lines.append("Commands: " + "; ".join(f"`{c}`" for c in report.get("commands", [report.get("command", "")])))
    if report.get("sim"):
        lines += ["", *render_sim(report)]
    if report.get("http"):
        lines += ["", *render_http(report["http"])]
    for note in report.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("sim", "http", "render"), default="sim")
    ap.add_argument("--jobs", type=int, default=1, help="simulations in parallel processes [1]")
    ap.add_argument("--duration", type=float, default=Plan.duration_s, help="seconds of arrivals (simulator)")
    ap.add_argument("--interactive-load", type=float, default=Plan.interactive_load)
    ap.add_argument("--flood-factor", type=float, default=Plan.flood_factor)
    ap.add_argument("--speed", type=float, default=0.5, help="HTTP: engine seconds per wall second [0.5]")
    ap.add_argument("--http-seconds", type=float, default=60.0, help="HTTP: wall seconds of arrivals [60]")
    ap.add_argument("--http-instances", type=int, default=2)
    ap.add_argument("--http-dp", type=int, default=4)
    ap.add_argument(
        "--http-capacity", type=float, default=0.56, help="HTTP: the capacity, fraction of the analytic one [0.56]"
    )
    ap.add_argument("--fronts", default=",".join(FRONTS), help=f"HTTP: comma-separated of {FRONTS}")
    ap.add_argument("--slices", type=int, default=1, help="time slices of the traces, each run in full [1]")
    ap.add_argument("--output", type=Path, default=RESULTS / "priorities")
    args = ap.parse_args()
    path = args.output.with_suffix(".json")
    report: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if args.part == "sim":
        plan = Plan(duration_s=args.duration, interactive_load=args.interactive_load, flood_factor=args.flood_factor)
        report["plan"] = plan.__dict__
        report.pop("command", None)
        report["commands"] = [
            " ".join(["python bench/priorities.py", *sys.argv[1:]]),
            *(c for c in report.get("commands", []) if "--part http" in c),
        ]
        report["sim"] = sim_part(plan, args.jobs, args.slices)
    elif args.part == "http":
        http = http_part(args)
        http["config"] = (
            f"{args.http_instances} SGLang-flavoured mock engines x {args.http_dp} DP ranks, profile as-shipped, "
            f"speed {args.speed}, {args.http_seconds:.0f} wall seconds of arrivals, capacity {args.http_capacity} of "
            f"the analytic; command `python bench/priorities.py {' '.join(sys.argv[1:])}`"
        )
        report["http"] = http
        report["commands"] = [
            *(c for c in report.get("commands", [report.get("command", "")]) if "--part http" not in c and c),
            " ".join(["python bench/priorities.py", *sys.argv[1:]]),
        ]
        report.pop("command", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    args.output.with_suffix(".md").write_text(render(report))
    print(render(report))


if __name__ == "__main__":
    main()
