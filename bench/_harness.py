"""Shared pieces of the HTTP benchmarks: processes on loopback, trace slices, load of a slice, result tables.

Imported by the scripts beside it (``python bench/<script>.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import venv
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

import yaml

from gateway.config import DecodeConfig, PhaseAwareConfig
from gateway.replay.client import PromptCount, run_bench
from gateway.sim.calibration import EngineModelConfig
from gateway.sim.capacity import Capacity, cluster_load
from gateway.sim.cluster import free_port, wait_ready
from gateway.workload.traces import TraceRequest, rescale

RESULTS = Path(__file__).parent / "results"


class Processes:
    """Processes started for one benchmark run; all are stopped (terminate, then kill) on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: Sequence[str], url: str, ready_path: str, log: Path | None = None) -> str:
        """Start ``cmd`` (its output to ``log``, or discarded) and wait until ``url + ready_path`` answers 200."""
        out = subprocess.DEVNULL if log is None else log.open("wb")
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL)
        self.procs.append(proc)
        asyncio.run(wait_ready(url + ready_path, timeout_s=60, is_alive=lambda: proc.poll() is None))
        return url

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def peer_venv(directory: Path, package: str) -> Path:
    """The ``bin`` folder of a virtual environment holding a peer router, created with ``package`` installed the
    first time (``directory`` is git-ignored; later runs reuse it)."""
    bin_dir = directory / "bin"
    if not (bin_dir / "python").exists():
        print(f"installing {package} into {directory}", file=sys.stderr)
        venv.create(directory, with_pip=True)
        subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--quiet", package], check=True)
    return bin_dir


def start_engines(
    procs: Processes,
    flavors: Sequence[str],
    dp_size: int,
    speed: float,
    model: str,
    *,
    profile: str = "idealised",
    tokenizer: str = "estimate",
) -> list[dict[str, Any]]:
    """Start one simulated engine per flavour (``gateway mock-engine --profile profile --tokenizer tokenizer``;
    the as-shipped profile has a prefix cache per DP rank); return their gateway engine configurations."""
    engines = []
    for i, flavor in enumerate(flavors):
        port = free_port()
        cmd = [sys.executable, "-m", "gateway", "mock-engine", "--flavor", flavor, "--dp-size", str(dp_size)]
        cmd += ["--port", str(port), "--model", model, "--speed", str(speed)]
        cmd += ["--profile", profile, "--tokenizer", tokenizer]
        url = procs.start(cmd, f"http://127.0.0.1:{port}", "/health")
        engines.append({"name": f"{flavor}{i}", "flavor": flavor, "url": url, "dp_size": dp_size, "models": [model]})
    return engines


SWITCHES: dict[str, tuple[str, str, Any, Any]] = {
    "adaptive_interval": ("window", "adaptive_interval", True, False),
    "step_aligned_close": ("window", "step_aligned_close", {}, None),
    "use_step_phase": ("allocator", "use_step_phase", True, False),
    "shortest_first": ("allocator", "shortest_first", True, False),
    "long_prefill_isolation": ("allocator", "long_prefill_tokens", PhaseAwareConfig().long_prefill_tokens, None),
    "prefill_capacity": ("allocator", "queue_steps", PhaseAwareConfig().queue_steps, None),
    "iqr_outliers": ("decode", "iqr_k", DecodeConfig().iqr_k, None),
}
"""Switches of the sbs configuration a :func:`gateway_variant` spec can flip: name → (section, setting, value when
on, value when off)."""


def gateway_variant(spec: str) -> dict[str, Any]:
    """The gateway configuration named by ``spec``: a policy, then any ``+switch`` / ``-switch`` of :data:`SWITCHES`
    that turns a part of sbs on or off (``sbs+step_aligned_close``, ``sbs-long_prefill_isolation``).

    Raises:
        ValueError: a switch not in :data:`SWITCHES`.
    """
    policy, *flags = re.split(r"(?=[+-])", spec)
    config: dict[str, Any] = {"policy": policy}
    for flag in flags:
        switch = SWITCHES.get(flag[1:])
        if switch is None:
            raise ValueError(f"{flag[1:]!r} in {spec!r} is not one of the switches {sorted(SWITCHES)}")
        section, name, on, off = switch
        config.setdefault(section, {})[name] = on if flag[0] == "+" else off
    return config


def start_gateway(procs: Processes, engines: list[dict[str, Any]], policy: str) -> str:
    """Start ``gateway serve`` in front of ``engines`` with ``policy`` (a :func:`gateway_variant` spec); return its
    URL."""
    port = free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump({**gateway_variant(policy), "engines": engines}, f)
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", f.name, "--port", str(port), "--log-level", "warning"]
    return procs.start(cmd, f"http://127.0.0.1:{port}", "/ready")


def write_slice(trace: list[TraceRequest], directory: str) -> str:
    """Write a trace slice as Mooncake-format JSONL (what ``gateway bench`` reads); return the path."""
    path = Path(directory) / "slice.jsonl"
    with path.open("w") as f:
        for r in trace:
            row: dict[str, Any] = {
                "timestamp": r.arrival_s * 1000,
                "input_length": r.prompt_tokens,
                "output_length": r.output_tokens,
            }
            if r.hash_ids:
                row["hash_ids"] = list(r.hash_ids)
            f.write(json.dumps(row) + "\n")
    return str(path)


def slice_load(
    slice_: list[TraceRequest], rate_scale: float, instances: int, dp_size: int, engine: EngineModelConfig | None = None
) -> Capacity:
    """The load a trace slice offers at ``rate_scale`` to ``instances`` x ``dp_size`` ranks of the engine model, and
    the cluster's capacity for it (:func:`gateway.sim.capacity.cluster_load`: the engine time the work needs at the
    engine model's most efficient operating point over ranks x span; policy-independent, no simulation).

    In engine time: for engines whose clock runs at ``speed``, pass ``rate_scale / speed``.
    """
    return cluster_load(rescale(slice_, rate_scale), engine or EngineModelConfig(), instances, dp_size)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:,.0f}"


def results_table(results: dict[str, dict[str, Any]]) -> str:
    """A fixed-width table of ``gateway bench`` summaries, one row per run."""
    lines = [
        f"{'run':<40}{'done':>6}{'fail':>6}{'TTFT mean':>11}{'TTFT p50':>10}{'TTFT p99':>10}"
        f"{'TPOT mean':>11}{'E2E p50 s':>11}{'out tok/s':>11}",
        f"{'':<40}{'':>6}{'':>6}{'ms':>11}{'ms':>10}{'ms':>10}{'ms':>11}{'':>11}{'':>11}",
    ]
    for name, s in results.items():
        ttft, tpot, e2e = s["ttft_s"], s["tpot_s"], s["e2e_s"]
        e2e_p50 = "-" if e2e["p50"] is None else f"{e2e['p50']:.1f}"
        lines.append(
            f"{name:<40}{s['completed']:>6}{s['failed']:>6}{_ms(ttft['mean']):>11}{_ms(ttft['p50']):>10}"
            f"{_ms(ttft['p99']):>10}{_ms(tpot['mean']):>11}{e2e_p50:>11}{s['output_throughput_tok_s']:>11.1f}"
        )
    return "\n".join(lines)


def add_slice_args(ap: argparse.ArgumentParser, *, minutes: float) -> None:
    """The options every HTTP benchmark shares: which trace slice, how fast, on which simulated cluster."""
    ap.add_argument("--trace", default="azure-conv", help="bundled trace name or file [azure-conv]")
    ap.add_argument("--start", type=float, default=0.0, help="slice start on the trace clock, seconds [0]")
    ap.add_argument("--minutes", type=float, default=minutes, help=f"slice length on the trace clock [{minutes:g}]")
    ap.add_argument("--rate-scale", type=float, default=0.6, help="divide inter-arrival times by this [0.6]")
    ap.add_argument("--speed", type=float, default=0.2, help="simulated engine clock speed [0.2]")
    ap.add_argument("--instances", type=int, default=2, help="engine instances [2]")
    ap.add_argument("--dp-size", type=int, default=4, help="DP ranks per instance [4]")
    ap.add_argument("--model", default="deepseek-v3")
    ap.add_argument(
        "--engine-profile",
        choices=("idealised", "as-shipped"),
        default="idealised",
        help="the simulated engines' model; as-shipped has a prefix cache per DP rank [idealised]",
    )
    ap.add_argument(
        "--prompts",
        choices=("estimate", "tokenizer"),
        default="estimate",
        help="replay prompts counted by the gateway's estimator, or real prose counted by DeepSeek-V3's tokenizer "
        "(the engines then count with it too); Mooncake's hash_ids become shared prompt text either way [estimate]",
    )


def replay_through(
    front: Callable[[Processes, list[dict[str, Any]]], str],
    flavors: Sequence[str],
    trace: list[TraceRequest],
    args: argparse.Namespace,
    probe: Callable[[list[dict[str, Any]], str], dict[str, Any]] | None = None,
    cluster: Callable[[Processes], list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Start fresh engines and the front (gateway or router) built by ``front``, replay ``trace``, stop all.

    ``probe(engines, front_url)``, if given, runs after the replay while everything is still up; what it returns
    is added to the summary under ``"probe"``. ``cluster(procs)``, if given, starts the engines instead of one
    mixed engine per flavour of ``flavors`` (a P/D cluster) and returns their gateway engine configurations.
    """
    with Processes() as procs, tempfile.TemporaryDirectory() as tmp:
        profile = getattr(args, "engine_profile", "idealised")
        prompts: PromptCount = "tokenizer" if getattr(args, "prompts", "estimate") == "tokenizer" else "estimate"
        tokenizer = "deepseek" if prompts == "tokenizer" else "estimate"
        engines = (
            cluster(procs)
            if cluster is not None
            else start_engines(
                procs, flavors, args.dp_size, args.speed, args.model, profile=profile, tokenizer=tokenizer
            )
        )
        url = front(procs, engines)
        summary = run_bench(
            url,
            write_slice(trace, tmp),
            rate_scale=args.rate_scale,
            model=args.model,
            progress=sys.stderr.isatty(),
            prompts=prompts,
        )
        if probe is not None:
            summary["probe"] = probe(engines, url)
        return summary


def write_report(args: argparse.Namespace, **fields: Any) -> None:
    """Write ``fields`` with the run's options as JSON to ``args.output``."""
    args.output.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.output.write_text(json.dumps({"config": config, **fields}, indent=2))
    print(f"\nwrote {args.output}", file=sys.stderr)


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds spent so far by process ``pid`` (all its threads) and its descendants alive now
    (Linux ``/proc``: ``stat`` fields 14 and 15, children from each task's ``children``)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            for task in Path(f"/proc/{current}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total
