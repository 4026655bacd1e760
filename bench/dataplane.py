"""The data plane's cost: requests/s, added latency and CPU per request of each front before one trivial engine.

Starts a trivial SGLang-flavoured engine with 4 DP ranks (``bench/_dataplane_upstream.py``: answers at once, raw
asyncio over uvloop, so the front is what is measured), then drives it, with a closed-loop load generator
(``bench/_dataplane_load.py``), through each front in turn:

- ``direct``: no front (the baseline the added latency is measured against);
- ``gateway round_robin`` and ``gateway sbs``: ``gateway serve`` with its defaults (log level ``info`` with the
  access log, ``upstream.stream_nonstreamed`` and ``stream_usage`` on); ``gateway sbs+running_before_first_token``
  with ``scrape.running_before_first_token`` on (the load view then does not count a request the engine already
  runs twice, so an idle engine looks idle and sbs's window closes at once for a lone request);
- ``smg round_robin``: the SGLang Model Gateway 1.13 (PyPI ``smg``, in ``bench/.venv-smg``), ``--dp-aware``
  (a worker per DP rank, the rank pinned in the body), retries off;
- ``vllm-router round_robin``: vllm-router 0.1.17 (PyPI, in ``bench/.venv-vllm-router``) with
  ``--intra-node-data-parallel-size 4``.

Each front runs three scenarios: non-streamed chat at 1 and at 64 connections (``--tokens`` output tokens) and
streamed chat at 64 connections (``--stream-tokens`` SSE events each). Each is warmed up, then measured for
``--seconds``: requests/s, latency p50/p99 and the latency it adds to ``direct``'s, and the CPU seconds the front's
process tree spent per 1,000 requests (``/proc/<pid>/stat`` of the front and its descendants, read when the
measured span starts and ends).

Cores: with three or more, the load generator, the engine and the front get one each; with two, the front gets
the second and the load generator and engine share the first (``taskset``). The machine's load average is
recorded: on a shared machine, compare the fronts as ratios within one run.

    .venv/bin/python bench/dataplane.py

prints the table and writes ``bench/results/dataplane.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import yaml
from _harness import RESULTS, Processes, peer_venv, tree_cpu_s

from gateway.sim.cluster import free_port

HERE = Path(__file__).parent
SMG_VENV = HERE / ".venv-smg"
SMG_PACKAGE = "smg==1.13.*"
"""The release issue 16 measured against (smg 1.13.0)."""
VLLM_ROUTER_VENV = HERE / ".venv-vllm-router"
VLLM_ROUTER_PACKAGE = "vllm-router==0.1.17"
"""The release ``bench/smg_pd.py`` uses."""
MODEL = "bench-model"
DP_SIZE = 4
NOTES_MARK = "<!-- notes: kept when the table above is regenerated -->"


@dataclass(frozen=True)
class Scenario:
    """One load: ``connections`` closed loops of non-streamed or streamed chat requests of ``tokens`` tokens."""

    name: str
    connections: int
    stream: bool
    tokens: int


@dataclass(frozen=True)
class Cores:
    """The CPU cores (``taskset`` lists) of the load generator, the engine and the front; ``None``: any."""

    load: str | None
    engine: str | None
    front: str | None

    @classmethod
    def choose(cls) -> Cores:
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) >= 3:
            return cls(str(cores[0]), str(cores[1]), str(cores[2]))
        if len(cores) == 2:
            return cls(str(cores[0]), str(cores[0]), str(cores[1]))
        return cls(None, None, None)


def pinned(cmd: list[str], cores: str | None) -> list[str]:
    """``cmd`` run on ``cores`` (``taskset -c``, so a multi-threaded front sizes its thread pool to them)."""
    return cmd if cores is None else ["taskset", "-c", cores, *cmd]


def start_engine(procs: Processes, cores: Cores) -> dict[str, Any]:
    """Start the trivial engine; return its gateway engine configuration."""
    port = free_port()
    cmd = [sys.executable, str(HERE / "_dataplane_upstream.py"), "--port", str(port), "--dp-size", str(DP_SIZE)]
    url = procs.start(pinned(cmd, cores.engine), f"http://127.0.0.1:{port}", "/health")
    return {"name": "trivial", "flavor": "sglang", "url": url, "dp_size": DP_SIZE, "models": [MODEL]}


def start_gateway(
    procs: Processes,
    engine: dict[str, Any],
    policy: str,
    cores: Cores,
    tree: Path | None = None,
    settings: dict[str, Any] | None = None,
) -> str:
    """Start ``gateway serve`` with ``policy``, ``settings`` and its defaults otherwise; from the source ``tree``
    (its folder holding ``gateway/``) instead of this checkout when given."""
    port = free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump({"policy": policy, **(settings or {}), "engines": [engine]}, f)
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", f.name, "--port", str(port)]
    if tree is not None:  # -P: the working directory's gateway/ does not shadow the tree's
        cmd = ["env", f"PYTHONPATH={tree}", sys.executable, "-P", *cmd[1:]]
    return procs.start(pinned(cmd, cores.front), f"http://127.0.0.1:{port}", "/ready")


def start_smg(procs: Processes, engine: dict[str, Any], cores: Cores) -> str:
    port, metrics_port = free_port(), free_port()
    cmd = [str(peer_venv(SMG_VENV, SMG_PACKAGE) / "smg"), "launch", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--worker-urls", engine["url"], "--policy", "round_robin", "--dp-aware", "--disable-retries"]
    cmd += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]
    url = procs.start(pinned(cmd, cores.front), f"http://127.0.0.1:{port}", "/readiness")
    deadline = time.monotonic() + 60  # workers register in the background after the port opens
    while httpx.get(url + "/readiness", timeout=5).json().get("healthy_workers", 0) < DP_SIZE:
        if time.monotonic() > deadline:
            raise RuntimeError(f"smg has fewer than {DP_SIZE} healthy DP-rank workers after 60 s")
        time.sleep(0.1)
    return url


def start_vllm_router(procs: Processes, engine: dict[str, Any], cores: Cores) -> str:
    port, metrics_port = free_port(), free_port()
    cmd = [str(peer_venv(VLLM_ROUTER_VENV, VLLM_ROUTER_PACKAGE) / "vllm-router"), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--worker-urls", engine["url"], "--policy", "round_robin"]
    cmd += ["--intra-node-data-parallel-size", str(DP_SIZE), "--disable-retries"]
    cmd += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]
    return procs.start(pinned(cmd, cores.front), f"http://127.0.0.1:{port}", "/health")


FRONTS: dict[str, Callable[[Processes, dict[str, Any], Cores], str]] = {
    "direct": lambda procs, engine, cores: str(engine["url"]),
    "gateway round_robin": lambda procs, engine, cores: start_gateway(procs, engine, "round_robin", cores),
    "gateway sbs": lambda procs, engine, cores: start_gateway(procs, engine, "sbs", cores),
    "gateway sbs+running_before_first_token": lambda procs, engine, cores: start_gateway(
        procs, engine, "sbs", cores, settings={"scrape": {"running_before_first_token": True}}
    ),
    "smg round_robin": start_smg,
    "vllm-router round_robin": start_vllm_router,
}
"""Each front: starts it before the engine and returns the URL the load is sent to."""


def base_gateway(procs: Processes, engine: dict[str, Any], cores: Cores, *, policy: str, tree: Path) -> str:
    return start_gateway(procs, engine, policy, cores, tree)


def drive(
    url: str, scenario: Scenario, front_pid: int | None, args: argparse.Namespace, cores: Cores
) -> dict[str, Any]:
    """Run the load generator against ``url``; the front's CPU is read when its measured span starts and ends."""
    cmd = [sys.executable, str(HERE / "_dataplane_load.py"), "--url", url, "--connections", str(scenario.connections)]
    cmd += ["--seconds", str(args.seconds), "--warmup", str(args.warmup), "--tokens", str(scenario.tokens)]
    cmd += ["--stream"] if scenario.stream else []
    proc = subprocess.Popen(pinned(cmd, cores.load), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    cpu: dict[str, float] = {}
    out = ""
    for line in proc.stdout:
        if line.strip() in ("start", "end") and front_pid is not None:
            cpu[line.strip()] = tree_cpu_s(front_pid)
        else:
            out = line
    if proc.wait() != 0:
        raise RuntimeError(f"the load generator failed on {url}")
    result = json.loads(out)
    n = result["requests"]
    summary: dict[str, Any] = {
        "requests": n,
        "errors": result["errors"],
        "span_s": result["span_s"],
        "rps": n / result["span_s"],
        **{f"p{q}_ms": None if result[f"p{q}_s"] is None else result[f"p{q}_s"] * 1000 for q in (50, 90, 99)},
    }
    if front_pid is not None and n:
        summary["front_cpu_s"] = cpu["end"] - cpu["start"]
        summary["cpu_s_per_1k"] = summary["front_cpu_s"] / n * 1000
    return summary


def engine_ranks(engine: dict[str, Any]) -> list[int]:
    served = httpx.get(f"{engine['url']}/_bench/ranks", timeout=5).json()["served"]
    return [int(n) for n in served]


def run(args: argparse.Namespace) -> dict[str, Any]:
    cores = Cores.choose()
    scenarios = [
        Scenario("non-streamed, 1 connection", 1, False, args.tokens),
        Scenario("non-streamed, 64 connections", 64, False, args.tokens),
        Scenario(f"streamed ({args.stream_tokens} events), 64 connections", 64, True, args.stream_tokens),
    ]
    fronts = dict(FRONTS)
    if args.base_tree is not None:
        for policy in ("round_robin", "sbs"):
            fronts[f"gateway {policy} (base)"] = partial(base_gateway, policy=policy, tree=args.base_tree)
    chosen = [f.strip() for f in args.fronts.split(",") if f.strip()]
    chosen += [name for name in fronts if name.endswith("(base)")]
    results: dict[str, Any] = {}
    for front in chosen:
        print(f"\n== {front}", file=sys.stderr)
        with Processes() as procs:
            engine = start_engine(procs, cores)
            url = fronts[front](procs, engine, cores)
            pid = procs.procs[-1].pid if front != "direct" else None
            before = engine_ranks(engine)
            runs = {}
            for scenario in scenarios:
                runs[scenario.name] = drive(url, scenario, pid, args, cores)
                r = runs[scenario.name]
                cpu = f", {r['cpu_s_per_1k']:.3f} CPU-s/1k" if "cpu_s_per_1k" in r else ""
                print(
                    f"  {scenario.name}: {r['rps']:,.0f} req/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
                    f"{r['errors']} errors{cpu}",
                    file=sys.stderr,
                )
            after = engine_ranks(engine)
            results[front] = {"scenarios": runs, "served_per_rank": [a - b for a, b in zip(after, before, strict=True)]}
    for front in results.values():
        for name, r in front["scenarios"].items():
            direct = results.get("direct", {}).get("scenarios", {}).get(name)
            if direct is not None and r["p50_ms"] is not None:
                r["added_p50_ms"] = r["p50_ms"] - direct["p50_ms"]
                r["added_p99_ms"] = r["p99_ms"] - direct["p99_ms"]
    return {"cores": cores.__dict__, "scenarios": [s.__dict__ for s in scenarios], "fronts": results}


def table(report: dict[str, Any]) -> str:
    """One Markdown table: a row per front and scenario."""
    lines = [
        "| front | scenario | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | CPU-s / 1k req | req / CPU-s "
        "| errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for front, data in report["fronts"].items():
        for name, r in data["scenarios"].items():
            added = [f"{r[k]:+.2f}" if k in r else "–" for k in ("added_p50_ms", "added_p99_ms")]
            cpu = r.get("cpu_s_per_1k")
            per_cpu = "–" if not cpu else f"{1000 / cpu:,.0f}"
            lines.append(
                f"| {front} | {name} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {added[0]} | "
                f"{added[1]} | {'–' if cpu is None else f'{cpu:.3f}'} | {per_cpu} | {r['errors']} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fronts", default=",".join(FRONTS), help=f"comma-separated, of {', '.join(FRONTS)}")
    ap.add_argument("--seconds", type=float, default=8.0, help="measured seconds per scenario [8]")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each [2]")
    ap.add_argument("--tokens", type=int, default=16, help="output tokens of a non-streamed request [16]")
    ap.add_argument("--stream-tokens", type=int, default=32, help="SSE events of a streamed request [32]")
    ap.add_argument(
        "--base-tree",
        type=Path,
        help="also run the gateway fronts from this source tree (e.g. `git archive <commit> gateway | tar -x -C DIR`)",
    )
    ap.add_argument("--output", type=Path, default=RESULTS / "dataplane.json")
    args = ap.parse_args()
    for front in args.fronts.split(","):
        if front.strip() and front.strip() not in FRONTS:
            ap.error(f"unknown front {front!r}")
    if "smg round_robin" in args.fronts:
        peer_venv(SMG_VENV, SMG_PACKAGE)
    if "vllm-router round_robin" in args.fronts:
        peer_venv(VLLM_ROUTER_VENV, VLLM_ROUTER_PACKAGE)
    load_before = os.getloadavg()
    report = run(args)
    command = shlex.join([".venv/bin/python", "bench/dataplane.py", *sys.argv[1:]])
    report = {
        "command": command,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "peers": {"smg": SMG_PACKAGE, "vllm-router": VLLM_ROUTER_PACKAGE},
        **report,
    }
    text = table(report)
    print("\n" + text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    loads = report["load_average"]
    md = args.output.with_suffix(".md")
    notes = md.read_text().partition(NOTES_MARK)[2] if md.exists() else ""
    md.write_text(
        "# The data plane: fronts before one trivial engine\n\n"
        f"`{command}`\n\n"
        f"Cores (taskset): load generator {report['cores']['load']}, engine {report['cores']['engine']}, front "
        f"{report['cores']['front']}; load average {loads['before'][0]:.2f} before, {loads['after'][0]:.2f} after "
        "(the machine is shared: compare fronts as ratios within one run).\n\n" + text + "\n\n" + NOTES_MARK + notes
    )
    print(f"\nwrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
