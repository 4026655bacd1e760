"""The gateway in front of a real vLLM on this CPU: the same streaming workload direct and through the gateway.

Starts one real vLLM server (SmolLM2-135M, ``--data-parallel-size 2``, via ``scripts/real_vllm.py``, which
installs it on first use), then replays one seeded synthetic workload (Poisson arrivals, prompt and output
lengths drawn once) three ways, each gateway run on a fresh gateway process, in the order A B C then C B A
(``--repeats 3``: A B C, C B A, A B C) so that drift of this shared machine does not favour whichever runs first:

- ``direct``: straight to vLLM, whose internal load balancer picks the DP rank;
- ``gateway round_robin``: immediate dispatch, each request pinned to the next rank by ``X-data-parallel-rank``;
- ``gateway sbs``: staggered windows and load-aware allocation.

vLLM runs with prefix caching off: every run replays the same prompts, and a cache warmed by the previous run
would favour the later ones. It reports TTFT, TPOT and throughput side by side (each run, then the mean over
runs, with the CPU seconds vLLM's processes and the gateway's used during each replay), and the gateway's
added latency: the median TTFT of
single-token requests sent one at a time (so nothing queues), interleaved direct / through each gateway so that
drift of this shared machine hits all alike, gateway minus direct.

    .venv/bin/python bench/direct_vs_gateway_vllm.py [--requests 80] [--rate 3] [--output-tokens 48] [--repeats 3]

prints the tables and writes ``bench/results/direct_vs_gateway_vllm.json`` and ``.txt``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from _harness import RESULTS, Processes, results_table, start_gateway

from gateway.replay.client import replay
from gateway.workload.stats import summarize
from gateway.workload.traces import TraceRequest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts import real_vllm  # the repo root is not on sys.path when run as bench/direct_vs_gateway_vllm.py

MODEL = "smollm2"
POLICIES = ("round_robin", "sbs")
DIRECT = "direct (vLLM internal LB)"


def cpu_s(pids: set[int]) -> float:
    """CPU time (user + system) used so far by the live processes ``pids``, seconds (from ``/proc``)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / os.sysconf("SC_CLK_TCK")


def mean_over_runs(results: dict[str, dict[str, Any]], names: list[str]) -> dict[str, dict[str, float]]:
    """Per configuration, the mean over its runs (``"<name> #<n>"``) of TTFT mean/p99, TPOT mean, output tok/s."""
    out = {}
    for name in names:
        runs = [s for key, s in results.items() if key.rsplit(" #", 1)[0] == name]
        out[name] = {
            "ttft_mean_s": statistics.fmean(s["ttft_s"]["mean"] for s in runs),
            "ttft_p99_s": statistics.fmean(s["ttft_s"]["p99"] for s in runs),
            "tpot_mean_s": statistics.fmean(s["tpot_s"]["mean"] for s in runs),
            "output_tok_s": statistics.fmean(s["output_throughput_tok_s"] for s in runs),
            "vllm_cpu_s": statistics.fmean(s["vllm_cpu_s"] for s in runs),
            "gateway_cpu_s": statistics.fmean(s["gateway_cpu_s"] for s in runs),
        }
    return out


def workload(n: int, rate: float, output_tokens: int, seed: int) -> list[TraceRequest]:
    """``n`` requests, Poisson arrivals at ``rate`` per second, prompts of 32–512 tokens (log-uniform)."""
    rng = random.Random(seed)
    arrival, out = 0.0, []
    for _ in range(n):
        prompt = round(2 ** rng.uniform(5, 9))
        out.append(TraceRequest(arrival, prompt, output_tokens))
        arrival += rng.expovariate(rate)
    return out


async def first_token_s(session: aiohttp.ClientSession, url: str) -> float:
    """TTFT of one single-token streamed completion, seconds."""
    body = {"model": MODEL, "prompt": "Say hi.", "max_tokens": 1, "stream": True, "ignore_eos": True}
    started = time.perf_counter()
    async with session.post(url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if line.startswith(b"data: {"):
                ttft = time.perf_counter() - started
                await resp.read()
                return ttft
    raise RuntimeError(f"{url} streamed no token")


async def added_latency(targets: dict[str, str], rounds: int) -> dict[str, Any]:
    """Median single-request TTFT per target over ``rounds`` interleaved rounds, and each minus ``direct``."""
    samples: dict[str, list[float]] = {name: [] for name in targets}
    async with aiohttp.ClientSession() as session:
        for url in targets.values():  # warm-up: connections, tokenizer caches
            await first_token_s(session, url)
        for _ in range(rounds):
            for name, url in targets.items():
                samples[name].append(await first_token_s(session, url))
    medians = {name: statistics.median(v) for name, v in samples.items()}
    return {
        "rounds": rounds,
        "ttft_median_s": medians,
        "added_median_s": {name: medians[name] - medians["direct"] for name in targets if name != "direct"},
        "ttft_p90_s": {name: statistics.quantiles(v, n=10)[-1] for name, v in samples.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=80)
    ap.add_argument("--rate", type=float, default=3.0, help="mean arrivals per second [3]")
    ap.add_argument("--repeats", type=int, default=3, help="passes over the three configurations [3]")
    ap.add_argument("--output-tokens", type=int, default=48)
    ap.add_argument("--max-num-seqs", type=int, default=8, help="vLLM --max-num-seqs per rank [8]")
    ap.add_argument("--probe-rounds", type=int, default=30, help="rounds of the added-latency probe [30]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", type=Path, default=RESULTS / "direct_vs_gateway_vllm.json")
    args = ap.parse_args()

    trace = workload(args.requests, args.rate, args.output_tokens, args.seed)
    real_vllm.install()
    load_before = os.getloadavg()[1]
    results: dict[str, dict[str, Any]] = {}
    no_prefix_cache = ["--no-enable-prefix-caching"]
    with real_vllm.running(MODEL, dp_size=2, max_num_seqs=args.max_num_seqs, extra_args=no_prefix_cache) as servers:
        vllm_url = servers[0].url
        engines = [{"name": "vllm", "flavor": "vllm", "url": vllm_url, "dp_size": 2, "models": [MODEL]}]
        asyncio.run(replay(vllm_url, trace[:4], model=MODEL, progress=False))  # warm-up
        configs = [(DIRECT, None), *((f"gateway {p}", p) for p in POLICIES)]
        for repeat in range(args.repeats):
            for name, policy in configs if repeat % 2 == 0 else configs[::-1]:
                with Processes() as procs:
                    url = start_gateway(procs, engines, policy) if policy else vllm_url
                    gateway = {p.pid for p in procs.procs}
                    engine = real_vllm.process_tree(servers[0].pid)
                    before = cpu_s(engine), cpu_s(gateway)
                    result = asyncio.run(replay(url, trace, model=MODEL, progress=sys.stderr.isatty()))
                    after = cpu_s(engine), cpu_s(gateway)
                summary = summarize(result)
                summary["vllm_cpu_s"], summary["gateway_cpu_s"] = (a - b for a, b in zip(after, before, strict=True))
                results[f"{name} #{repeat + 1}"] = summary
                print(f"{name} #{repeat + 1}: done", file=sys.stderr)
        with Processes() as procs:
            targets = {"direct": vllm_url, **{f"gateway {p}": start_gateway(procs, engines, p) for p in POLICIES}}
            probe = asyncio.run(added_latency(targets, args.probe_rounds))

    load_after = os.getloadavg()[1]
    table = results_table(dict(sorted(results.items())))
    means = mean_over_runs(results, [name for name, _ in configs])
    lines = [
        f"Real vLLM 0.32 (vllm-cpu), SmolLM2-135M bf16, --data-parallel-size 2, --max-num-seqs {args.max_num_seqs},",
        f"{args.requests} streaming requests, Poisson {args.rate}/s, prompts 32-512 tokens, {args.output_tokens} "
        f"output tokens (ignore_eos), seed {args.seed}.",
        f"Machine: {os.cpu_count()} cores, 5-minute load average {load_before:.1f} before the runs and "
        f"{load_after:.1f} after them; vLLM's two DP",
        "ranks (one CPU each, at a lower CPU priority), the gateway process and the load generator all run on them, so",
        "the gateway's own CPU time slows the engine too. Compare the rows of one configuration before reading a",
        "difference: anything else running on the machine shows as a run slower than its repeats.",
        "",
        table,
        "",
        f"Mean over the {args.repeats} runs of each:",
        f"{'':<28}{'TTFT mean ms':>14}{'TTFT p99 ms':>13}{'TPOT mean ms':>14}{'out tok/s':>11}{'vLLM CPU s':>12}"
        f"{'gateway CPU s':>15}",
        *(
            f"{name:<28}{m['ttft_mean_s'] * 1000:>14.0f}{m['ttft_p99_s'] * 1000:>13.0f}{m['tpot_mean_s'] * 1000:>14.1f}"
            f"{m['output_tok_s']:>11.1f}{m['vllm_cpu_s']:>12.1f}{m['gateway_cpu_s']:>15.1f}"
            for name, m in means.items()
        ),
        "",
        f"Gateway added latency: median TTFT of 1-token requests sent one at a time, {probe['rounds']} interleaved "
        "rounds:",
    ]
    for name, ttft in probe["ttft_median_s"].items():
        added = probe["added_median_s"].get(name)
        extra = "" if added is None else f"   added {added * 1000:+.1f} ms"
        lines.append(f"  {name:<22} {ttft * 1000:7.1f} ms{extra}")
    text = "\n".join(lines)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {
        "config": config,
        "cpus": os.cpu_count(),
        "load_average_5min": {"before": load_before, "after": load_after},
        "runs": results,
        "means": means,
        "added_latency": probe,
    }
    args.output.write_text(json.dumps(report, indent=2))
    args.output.with_suffix(".txt").write_text(text + "\n")
    print(f"\nwrote {args.output} and .txt", file=sys.stderr)


if __name__ == "__main__":
    main()
