"""Many front doors, one scheduling view, over HTTP on loopback: what a second front-door process buys on this
machine, and whether two front doors sharing the scheduler service schedule as one does.

**Throughput** (``--part throughput``): two vLLM-flavoured simulated engines (4 DP ranks each, clock at
``--fast-speed``, so they answer at once) behind ``gateway serve --workers 1`` (today's single process) and
``--workers 2`` (two front doors and the scheduler service), and one front door consulting a ``gateway scheduler``
process (``1+service``: what the service's round trips cost, without a second front door), for each policy of
``--policies``; a closed-loop client
in a process of its own keeps ``--connections`` non-streamed requests of 4 output tokens in flight for
``--seconds``. Reported: requests per second, and the CPU-seconds per 1,000 requests of the gateway's processes
(all of them: supervisor, front doors, service) and of the whole machine's load generator and engines.

**Scheduling picture** (``--part picture``): a slice of a trace replayed at the given rate through

- ``one``: one gateway process;
- ``workers2``: ``gateway serve --workers 2`` (the kernel spreads the client's connections over the two front
  doors; both place through the one scheduler service);
- ``split2``: two independent gateway processes, each sent every other request of the trace (each schedules with
  its own window and load view: the failure mode the service removes);

each before fresh engines (``--speed``), for each policy. Reported: TTFT and TPOT as the client saw them, and the
requests each DP rank completed (the engines' ``vllm:request_success_total``).

**Against the simulator** (``--part simulator``, issue 16 §4): the same slice through ``one`` and ``workers2`` over
HTTP, and through ``gateway simulate``'s code (:func:`gateway.sim.simulate.simulate`) on the same cluster and
engine model, in the engines' time. The simulated engines run ``--speed`` engine seconds per wall second and the
client sends the slice at ``--rate-scale``, so in engine time the slice arrives at ``rate_scale / speed`` and a wall
TTFT is ``speed`` times as long in engine seconds; the gateway's own wall-clock constants (window intervals, scrape
interval and staleness) are likewise ``speed`` times as long in engine time, and the simulation is given them so.
The simulation has one front door: the simulator's K-front-door mode with ``service`` sharing at zero latency runs
exactly the plain simulation (``tests/unit/test_frontdoors.py``), so ``workers2`` is compared with the plain
simulation, the difference bounding what the service's round trips and the HTTP stack cost.

    .venv/bin/python bench/frontdoors_http.py --part throughput
    .venv/bin/python bench/frontdoors_http.py --part picture --minutes 1
    .venv/bin/python bench/frontdoors_http.py --part simulator --minutes 1

writes ``bench/results/frontdoors_http_throughput.json``, ``bench/results/frontdoors_http_picture.json`` or
``bench/results/frontdoors_http_simulator.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import yaml
from _harness import (
    RESULTS,
    Processes,
    add_slice_args,
    gateway_variant,
    start_engines,
    tree_cpu_s,
    write_report,
)

from gateway.config import ScrapeConfig, WindowConfig
from gateway.replay.client import replay
from gateway.sim.cluster import free_port
from gateway.sim.simulate import SimConfig, simulate
from gateway.workload.stats import ReplayResult, distribution, summarize
from gateway.workload.traces import TraceRequest, load_trace, rescale, resolve_trace, window


def start_front(
    procs: Processes, engines: list[dict[str, Any]], policy: str, workers: int, service: bool = False
) -> tuple[str, list[int]]:
    """``gateway serve --workers workers`` before ``engines``; its URL, and the pids whose process trees are the
    gateway. With ``service`` (and one worker), a ``gateway scheduler`` process on a Unix socket first, which the
    front door consults (``scheduler_service.url``)."""
    port = free_port()
    config = {**gateway_variant(policy), "engines": engines, "log": {"access_log": False}}
    pids = []
    if service:
        socket_path = Path(tempfile.mkdtemp()) / "scheduler.sock"
        config["scheduler_service"] = {"url": f"unix:{socket_path}"}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f)
    if service:
        cmd = [sys.executable, "-m", "gateway", "scheduler", "--config", f.name, "--unix-socket", str(socket_path)]
        procs.procs.append(subprocess.Popen([*cmd, "--log-level", "warning"]))
        pids.append(procs.procs[-1].pid)
        asyncio.run(wait_for_socket(socket_path))
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", f.name, "--port", str(port)]
    cmd += ["--log-level", "warning", "--workers", str(workers)]
    url = procs.start(cmd, f"http://127.0.0.1:{port}", "/ready")
    return url, [*pids, procs.procs[-1].pid]


async def wait_for_socket(path: Path) -> None:
    """Wait until the scheduler service answers on the Unix socket ``path`` (at most 60 s)."""
    for _ in range(600):
        try:
            async with (
                aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as session,
                session.get("http://scheduler/v1/health") as response,
            ):
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"no scheduler service on {path}")


# -- throughput ----------------------------------------------------------------------------------------------


async def closed_loop(url: str, model: str, connections: int, seconds: float) -> dict[str, Any]:
    """Keep ``connections`` requests in flight for ``seconds``; count answers and failures."""
    body = {"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}
    done = failed = 0
    stop = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker() -> None:
            nonlocal done, failed
            while time.perf_counter() < stop:
                try:
                    async with session.post(url + "/v1/chat/completions", json=body) as response:
                        await response.read()
                        ok = response.status == 200
                except aiohttp.ClientError:
                    ok = False
                done += ok
                failed += not ok

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        wall = time.perf_counter() - start
    return {"completed": done, "failed": failed, "wall_s": wall}


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for policy in args.policies.split(","):
        for front in ("1", "1+service", "2"):
            with Processes() as procs:
                engines = start_engines(procs, ["vllm", "vllm"], 4, args.fast_speed, args.model)
                engine_pids = [p.pid for p in procs.procs]
                url, pids = start_front(procs, engines, policy, int(front[0]), service=front == "1+service")
                subprocess.run(  # warm up: connections, the first windows
                    [
                        sys.executable,
                        __file__,
                        "--load",
                        url,
                        "--model",
                        args.model,
                        "--connections",
                        "8",
                        "--seconds",
                        "2",
                    ],
                    check=True,
                    capture_output=True,
                )
                cpu0 = [tree_cpu_s(pid) for pid in pids]
                engines0 = sum(tree_cpu_s(p) for p in engine_pids)
                load_cmd = [sys.executable, __file__, "--load", url, "--model", args.model]
                load_cmd += ["--connections", str(args.connections), "--seconds", str(args.seconds)]
                load = subprocess.run(
                    load_cmd,
                    check=True,
                    capture_output=True,
                    text=True,
                )
                gateway_cpu = [tree_cpu_s(pid) - before for pid, before in zip(pids, cpu0, strict=True)]
                engines_cpu = sum(tree_cpu_s(p) for p in engine_pids) - engines0
            result = json.loads(load.stdout)
            per_k = 1000 / max(1, result["completed"])
            row = {
                "policy": policy,
                "workers": front,
                "requests_per_s": round(result["completed"] / result["wall_s"], 1),
                "failed": result["failed"],
                "gateway_cpu_s_per_1k": round(sum(gateway_cpu) * per_k, 3),
                "service_cpu_s_per_1k": round(gateway_cpu[0] * per_k, 3) if front == "1+service" else None,
                "engines_cpu_s_per_1k": round(engines_cpu * per_k, 3),
            }
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
    lines = [
        f"{'policy':<14}{'workers':>10}{'req/s':>10}{'failed':>8}{'gateway CPU-s/1k':>18}{'of which service':>18}"
        f"{'engines CPU-s/1k':>18}"
    ]
    for r in rows:
        service = "-" if r["service_cpu_s_per_1k"] is None else f"{r['service_cpu_s_per_1k']:.3f}"
        lines.append(
            f"{r['policy']:<14}{r['workers']:>10}{r['requests_per_s']:>10.1f}{r['failed']:>8}"
            f"{r['gateway_cpu_s_per_1k']:>18.3f}{service:>18}{r['engines_cpu_s_per_1k']:>18.3f}"
        )
    return {"rows": rows, "table": "\n".join(lines), "cpus": os.cpu_count()}


# -- scheduling picture --------------------------------------------------------------------------------------


def per_rank_requests(engines: list[dict[str, Any]]) -> dict[str, float]:
    """Requests each DP rank completed, ``engine/rank`` → count (the engines' ``vllm:request_success_total``)."""
    from gateway.telemetry import sum_samples

    out = {}
    for engine in engines:
        text = httpx.get(str(engine["url"]) + "/metrics", timeout=10).text
        for rank in range(int(engine["dp_size"])):
            out[f"{engine['name']}/{rank}"] = sum_samples(text, "vllm:request_success_total", engine=str(rank))
    return out


def http_run(args: argparse.Namespace, trace: list[TraceRequest], policy: str, front: str) -> dict[str, Any]:
    """Replay ``trace`` through ``front`` (``one``, ``workers2`` or ``split2``) with ``policy`` before fresh
    engines; the replay's summary with the requests each DP rank completed (``per_rank_requests``)."""
    with Processes() as procs:
        engines = start_engines(procs, ["vllm"] * args.instances, args.dp_size, args.speed, args.model)
        if front == "split2":
            urls = [start_front(procs, engines, policy, 1)[0] for _ in range(2)]
            halves = [trace[0::2], trace[1::2]]
        else:
            urls = [start_front(procs, engines, policy, 2 if front == "workers2" else 1)[0]]
            halves = [trace]

        async def run() -> list[ReplayResult]:
            return list(
                await asyncio.gather(
                    *(
                        replay(url, half, model=args.model, rate_scale=args.rate_scale, progress=False)
                        for url, half in zip(urls, halves, strict=True)
                    )
                )
            )

        results = asyncio.run(run())
        ranks = per_rank_requests(engines)
    merged = ReplayResult(
        records=[r for result in results for r in result.records],
        wall_s=max(r.wall_s for r in results),
        url=",".join(urls),
        model=args.model,
        endpoint="chat",
        rate_scale=args.rate_scale,
        duration_limit_s=None,
        trace_requests=len(trace),
    )
    summary = summarize(merged)
    summary["per_rank_requests"] = ranks
    return summary


def picture(args: argparse.Namespace) -> dict[str, Any]:
    trace = window(load_trace(resolve_trace(args.trace)), args.start, args.minutes * 60)
    runs: dict[str, Any] = {}
    for policy in args.policies.split(","):
        for front in ("one", "workers2", "split2"):
            summary = http_run(args, trace, policy, front)
            ranks = summary["per_rank_requests"]
            name = f"{policy} {front}"
            runs[name] = summary
            print(f"{name}: TTFT mean {summary['ttft_s']['mean']}, per rank {list(ranks.values())}", file=sys.stderr)
    lines = [
        f"{'run':<24}{'done':>6}{'fail':>6}{'TTFT mean ms':>14}{'p50':>8}{'p99':>8}{'TPOT mean ms':>14}"
        f"{'rank requests (min-max)':>26}"
    ]
    for name, s in runs.items():
        counts = list(s["per_rank_requests"].values())
        ttft = s["ttft_s"]
        lines.append(
            f"{name:<24}{s['completed']:>6}{s['failed']:>6}{ttft['mean'] * 1000:>14.0f}{ttft['p50'] * 1000:>8.0f}"
            f"{ttft['p99'] * 1000:>8.0f}{s['tpot_s']['mean'] * 1000:>14.1f}"
            f"{f'{min(counts):.0f}-{max(counts):.0f}':>26}"
        )
    return {"runs": runs, "table": "\n".join(lines)}


# -- against the simulator ---------------------------------------------------------------------------------


def simulated(args: argparse.Namespace, trace: list[TraceRequest], policy: str) -> dict[str, Any]:
    """``trace`` through :func:`~gateway.sim.simulate.simulate` as the HTTP run sees it, in engine seconds (the
    module docstring): arrivals ``rate_scale / speed`` as fast, the gateway's wall-clock constants ``speed`` times
    as long. TTFT and TPOT distributions, and the requests each DP rank was given."""
    speed = args.speed
    window_defaults, scrape_defaults = WindowConfig(), ScrapeConfig()
    config = SimConfig(
        policy=policy,
        instances=args.instances,
        dp_size=args.dp_size,
        window=window_defaults.model_copy(
            update={
                "min_interval_s": window_defaults.min_interval_s * speed,
                "max_interval_s": window_defaults.max_interval_s * speed,
                "initial_step_s": window_defaults.initial_step_s * speed,
            }
        ),
        scrape_interval_s=scrape_defaults.interval_s * speed,
        stale_after_s=scrape_defaults.stale_after_s * speed,
    )
    result = simulate(rescale(trace, args.rate_scale / speed), config)
    done = [r for r in result.records if r.done_s is not None and r.first_token_s is not None]
    return {
        "completed": len(done),
        "ttft_engine_s": distribution([r.ttft_s for r in done]),
        "tpot_engine_s": distribution([r.tpot_s for r in done if r.output_tokens > 1]),
    }


def in_engine_time(summary: dict[str, Any], speed: float) -> dict[str, Any]:
    """An HTTP run's TTFT and TPOT distributions in engine seconds (wall seconds times ``speed``)."""
    return {
        "completed": summary["completed"],
        "failed": summary["failed"],
        "ttft_engine_s": {k: None if v is None else v * speed for k, v in summary["ttft_s"].items()},
        "tpot_engine_s": {k: None if v is None else v * speed for k, v in summary["tpot_s"].items()},
    }


def versus_simulator(args: argparse.Namespace) -> dict[str, Any]:
    trace = window(load_trace(resolve_trace(args.trace)), args.start, args.minutes * 60)
    runs: dict[str, Any] = {}
    for policy in args.policies.split(","):
        runs[f"{policy} simulated"] = simulated(args, trace, policy)
        for front in ("one", "workers2"):
            summary = http_run(args, trace, policy, front)
            runs[f"{policy} {front}"] = {**in_engine_time(summary, args.speed), "http": summary}
            print(f"{policy} {front}: TTFT mean {summary['ttft_s']['mean']} s wall", file=sys.stderr)
    lines = [
        f"{'run':<24}{'done':>6}{'fail':>6}{'TTFT mean ms':>14}{'p50':>8}{'p90':>8}{'p99':>8}{'TPOT mean ms':>14}"
        f"{'TTFT mean vs sim':>18}"
    ]
    for name, s in runs.items():
        ttft, tpot = s["ttft_engine_s"], s["tpot_engine_s"]
        sim = runs[f"{name.split()[0]} simulated"]["ttft_engine_s"]["mean"]
        versus = f"{ttft['mean'] / sim - 1:+.1%}"
        lines.append(
            f"{name:<24}{s['completed']:>6}{s.get('failed', 0):>6}{ttft['mean'] * 1000:>14.0f}"
            f"{ttft['p50'] * 1000:>8.0f}{ttft['p90'] * 1000:>8.0f}{ttft['p99'] * 1000:>8.0f}"
            f"{tpot['mean'] * 1000:>14.1f}{versus:>18}"
        )
    return {"runs": runs, "table": "engine-time milliseconds\n" + "\n".join(lines)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("throughput", "picture", "simulator"), default="picture")
    add_slice_args(ap, minutes=1.0)
    ap.add_argument("--policies", default="round_robin,sbs", help="comma-separated policies [round_robin,sbs]")
    ap.add_argument("--connections", type=int, default=64, help="throughput: requests kept in flight [64]")
    ap.add_argument("--seconds", type=float, default=10.0, help="throughput: length of the load [10]")
    ap.add_argument("--fast-speed", type=float, default=20.0, help="throughput: the engines' clock speed [20]")
    ap.add_argument("--load", default=None, help=argparse.SUPPRESS)  # the load generator's own process
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args()
    if args.load is not None:
        print(json.dumps(asyncio.run(closed_loop(args.load, args.model, args.connections, args.seconds))))
        return
    args.output = args.output or RESULTS / f"frontdoors_http_{args.part}.json"
    parts = {"throughput": throughput, "picture": picture, "simulator": versus_simulator}
    report = parts[args.part](args)
    print(report["table"])
    write_report(args, **report)


if __name__ == "__main__":
    main()
