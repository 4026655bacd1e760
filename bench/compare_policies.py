"""Replay a slice of a real trace through the gateway once per policy, on identical simulated engines.

Every policy gets fresh engine processes (``gateway mock-engine``), a fresh gateway process (``gateway serve``)
and the same requests at the same (rescaled) arrival times; the replay client runs in this process. The offered
load is reported as a fraction of the simulated cluster's capacity (see :func:`offered_load`).

    .venv/bin/python bench/compare_policies.py --minutes 5 --rate-scale 0.6 --speed 0.2

prints TTFT p50/p99, TPOT and throughput per policy and writes ``bench/results/compare_policies.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

from gateway.replay.client import run_bench
from gateway.replay.traces import TraceRequest, load_trace, rescale, resolve_trace, window
from gateway.sim.simulate import SimConfig, SimResult, simulate

RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def offered_load(
    slice_: list[TraceRequest], full: list[TraceRequest], rate_scale: float, instances: int, dp_size: int
) -> tuple[float, float]:
    """The offered load of a trace slice as a fraction of the simulated cluster's capacity, in virtual time.

    Capacity is the output throughput the same cluster (same engine model, round robin) sustains when the whole
    trace ``full`` arrives faster than it can serve: the arrival rate is doubled until the cluster falls behind
    (sustained output below 90% of offered), and the best sustained throughput of that rate and 1.5x, 2x, 3x
    it is taken. A long trace keeps ramp-up and drain effects small. The offered load is the slice's output
    tokens per second at ``rate_scale``, in engine time (the engine clock speed cancels out: pass
    ``rate_scale / speed``).

    Returns:
        ``(offered load fraction, capacity in output tokens per engine-second)``.
    """
    config = SimConfig(policy="round_robin", instances=instances, dp_size=dp_size)
    total_out = sum(r.output_tokens for r in full)
    factor = 1.0
    while True:
        offered_full = total_out / ((full[-1].arrival_s - full[0].arrival_s) / factor)
        if sustained_output_tok_s(simulate(rescale(full, factor), config)) < 0.9 * offered_full or factor > 1e3:
            break
        factor *= 2
    capacity = max(sustained_output_tok_s(simulate(rescale(full, factor * k), config)) for k in (1.0, 1.5, 2.0, 3.0))
    span = (slice_[-1].arrival_s - slice_[0].arrival_s) / rate_scale
    return sum(r.output_tokens for r in slice_) / span / capacity, capacity


def sustained_output_tok_s(result: SimResult) -> float:
    """Output tokens per second produced while requests were still arriving (tokens of a request spread
    evenly between its first token and its end)."""
    start = result.records[0].arrival_s
    end = result.records[-1].arrival_s
    produced = 0.0
    for r in result.records:
        if r.first_token_s is None or r.done_s is None or r.first_token_s >= end:
            continue
        if r.done_s <= end:
            produced += r.output_tokens
        else:
            produced += r.output_tokens * (end - r.first_token_s) / (r.done_s - r.first_token_s)
    return produced / (end - start)


def wait_ready(url: str, path: str, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + path, timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url}{path} not ready after {timeout_s} s")


@contextlib.contextmanager
def stack(policy: str, instances: int, dp_size: int, speed: float, model: str) -> Iterator[str]:
    """Start ``instances`` simulated engines (alternating SGLang/vLLM flavour) and a gateway; yield its URL."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        engines = []
        for i in range(instances):
            flavor = "sglang" if i % 2 == 0 else "vllm"
            port = free_port()
            cmd = [
                sys.executable,
                "-m",
                "gateway",
                "mock-engine",
                "--flavor",
                flavor,
                "--dp-size",
                str(dp_size),
                "--port",
                str(port),
                "--model",
                model,
                "--speed",
                str(speed),
            ]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, "/health", procs[-1])
            engines.append(
                {"name": f"{flavor}{i}", "flavor": flavor, "url": url, "dp_size": dp_size, "models": [model]}
            )
        port = free_port()
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump({"policy": policy, "engines": engines}, f)
        cmd = [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--config",
            f.name,
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, "/ready", procs[-1])
        yield url
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default="azure-conv", help="bundled trace name or file [azure-conv]")
    ap.add_argument("--start", type=float, default=0.0, help="slice start on the trace clock, seconds [0]")
    ap.add_argument("--minutes", type=float, default=5.0, help="slice length on the trace clock, minutes [5]")
    ap.add_argument("--rate-scale", type=float, default=0.6, help="divide inter-arrival times by this [0.6]")
    ap.add_argument("--speed", type=float, default=0.2, help="simulated engine clock speed [0.2]")
    ap.add_argument("--instances", type=int, default=2, help="engine instances [2]")
    ap.add_argument("--dp-size", type=int, default=4, help="DP ranks per instance [4]")
    ap.add_argument("--policies", default="sbs,round_robin", help="comma-separated policies [sbs,round_robin]")
    ap.add_argument("--model", default="deepseek-v3")
    ap.add_argument("--output", type=Path, default=RESULTS / "compare_policies.json")
    args = ap.parse_args()

    full = load_trace(resolve_trace(args.trace))
    trace = window(full, args.start, args.minutes * 60)
    # in engine time the replay's arrivals are rate_scale / speed times faster than the trace
    load, capacity = offered_load(trace, full, args.rate_scale / args.speed, args.instances, args.dp_size)
    print(
        f"{len(trace)} requests from {args.trace} [{args.start:.0f} s, +{args.minutes:g} min], "
        f"rate x{args.rate_scale}, "
        f"{args.instances} instances x {args.dp_size} ranks at speed {args.speed}: offered load {load:.0%} of "
        f"capacity ({capacity * args.speed:,.0f} output tok/s at this speed)",
        file=sys.stderr,
    )

    results: dict[str, object] = {}
    for policy in args.policies.split(","):
        print(f"\n== {policy}", file=sys.stderr)
        with (
            stack(policy, args.instances, args.dp_size, args.speed, args.model) as url,
            tempfile.TemporaryDirectory() as tmp,
        ):
            trace_file = Path(tmp) / "slice.jsonl"
            with trace_file.open("w") as f:
                for r in trace:
                    f.write(
                        json.dumps(
                            {
                                "timestamp": r.arrival_s * 1000,
                                "input_length": r.prompt_tokens,
                                "output_length": r.output_tokens,
                            }
                        )
                        + "\n"
                    )
            results[policy] = run_bench(
                url, str(trace_file), rate_scale=args.rate_scale, model=args.model, progress=sys.stderr.isatty()
            )

    header = (
        f"{'policy':<16}{'done':>6}{'fail':>6}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}{'TPOT mean ms':>14}"
        f"{'E2E p50 s':>11}{'out tok/s':>11}"
    )
    print("\n" + header)
    for policy, summary in results.items():
        assert isinstance(summary, dict)
        ttft, tpot, e2e = summary["ttft_s"], summary["tpot_s"], summary["e2e_s"]
        e2e_p50 = "-" if e2e["p50"] is None else f"{e2e['p50']:.1f}"
        print(
            f"{policy:<16}{summary['completed']:>6}{summary['failed']:>6}{fmt_ms(ttft['p50']):>13}"
            f"{fmt_ms(ttft['p99']):>13}{fmt_ms(tpot['mean']):>14}{e2e_p50:>11}"
            f"{summary['output_throughput_tok_s']:>11.1f}"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "requests": len(trace),
        "offered_load": load,
        "capacity_output_tok_s": capacity * args.speed,
        "policies": results,
    }
    args.output.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
