"""Soak: an hour of real trace traffic through the gateway, compressed in time, with faults injected throughout.

Starts two simulated engines (SGLang and vLLM flavours, ``gateway mock-engine``) and the gateway (``gateway
serve``, policy ``sbs``) as processes on loopback, then, all at once:

- replays the Azure conversation trace (the whole hour by default) at ``--rate-scale`` times its rate, output
  lengths capped at ``--max-output`` tokens to keep the relay's CPU within two cores;
- cycles through the faults of :mod:`gateway.sim.mock_engine.faults` on the engines every ``--fault-every`` seconds
  (HTTP 500s, crashes mid-stream, hung requests, streams without ``[DONE]`` or going silent, failed and hung
  health checks, garbage and hung ``/metrics``), and kills one engine process outright and restarts it;
- sends malformed requests (bad JSON, wrong types, absurd ``max_tokens``, empty messages, invalid UTF-8,
  oversized bodies, unknown model) and checks each gets a 4xx OpenAI-style error;
- opens streams and hangs up on them after a random moment (client disconnects);
- samples the gateway's resident memory (``/proc/PID/status``).

Afterwards it checks that nothing is left anywhere: the gateway has no request in flight or in its window, and
the engines have none running or waiting. A request is **lost** when its client got neither a complete answer
nor an explicit error (a 4xx/5xx, or an SSE error event before ``[DONE]``): a time-out, a connection reset
or a stream that stopped without a word.

    .venv/bin/python bench/soak.py                # the whole hour at 6x: about 10 minutes
    .venv/bin/python bench/soak.py --minutes 5    # a quick look

writes ``bench/results/soak.json`` and prints the summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

import httpx
import yaml
from _harness import RESULTS, Processes, start_engines, write_report
from prometheus_client.parser import text_string_to_metric_families

from gateway.replay.client import replay
from gateway.sim.cluster import free_port
from gateway.telemetry import sum_samples as metric
from gateway.workload.stats import summarize
from gateway.workload.traces import load_trace, resolve_trace, window

MODEL = "deepseek-v3"
EXPLICIT_FAILURES = ("HTTP ", "stream error")
"""Failure reasons (``RequestRecord.error`` prefixes) that are an explicit answer, not a lost request."""

FAULTS: list[tuple[str, dict[str, Any], float]] = [
    ("sglang0", {"generate": "http_500"}, 5.0),
    ("vllm1", {"generate": "kill_mid_stream", "after_chunks": 3, "remaining": 5}, 0.0),
    ("sglang0", {"generate": "hang", "remaining": 3}, 0.0),
    ("vllm1", {"health": "fail"}, 8.0),
    ("sglang0", {"metrics": "garbage"}, 10.0),
    ("vllm1", {"metrics": "hang"}, 10.0),
    ("sglang0", {"generate": "end_without_done", "after_chunks": 2, "remaining": 3}, 0.0),
    ("vllm1", {"generate": "stall_mid_stream", "after_chunks": 2, "remaining": 2}, 0.0),
    ("sglang0", {"kill_process": True}, 5.0),
]
"""(engine, fault plan, seconds before it is cleared; 0 = it clears itself via ``remaining``)."""

BAD_INPUTS: list[tuple[str, bytes]] = [
    ("invalid JSON", b'{"model": "deepseek-v3", "messages": ['),
    ("wrong types", json.dumps({"model": MODEL, "messages": "hi", "max_tokens": "many"}).encode()),
    ("negative max_tokens", json.dumps({"model": MODEL, "messages": [], "max_tokens": -5}).encode()),
    ("absurd max_tokens", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 10**12}).encode()),
    ("empty messages", json.dumps({"model": MODEL, "messages": []}).encode()),
    ("invalid UTF-8", b'{"model": "deepseek-v3", "prompt": "\xff\xfe"}'),
    ("unknown model", json.dumps({"model": "gpt-9", "prompt": "x"}).encode()),
    ("not an object", b"[1, 2, 3]"),
    ("oversized body", b'{"prompt": "' + b"x" * (1024 * 1024 + 10) + b'"}'),
]


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def metric_by(text: str, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                key = s.labels.get(label, "")
                out[key] = out.get(key, 0) + s.value
    return out


class Soak:
    def __init__(self, args: argparse.Namespace, procs: SoakProcesses, engines: list[dict[str, Any]]) -> None:
        self.args = args
        self.procs = procs
        self.engines = {e["name"]: e for e in engines}
        self.engine_cmds: dict[str, list[str]] = {}
        self.rng = random.Random(args.seed)
        self.faults_injected: Counter[str] = Counter()
        self.bad_inputs: Counter[str] = Counter()
        self.bad_input_wrong: list[str] = []
        self.disconnects = 0
        self.memory: list[tuple[float, int]] = []
        self.done = asyncio.Event()

    async def inject_faults(self, http: httpx.AsyncClient) -> None:
        i = 0
        while not self.done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), self.args.fault_every)
                return
            name, plan, hold = FAULTS[i % len(FAULTS)]
            i += 1
            url = self.engines[name]["url"]
            label = ",".join(f"{k}={v}" for k, v in plan.items() if k not in ("after_chunks", "remaining"))
            self.faults_injected[f"{name}: {label}"] += 1
            if plan.get("kill_process"):
                await asyncio.to_thread(self.procs.kill_and_restart, url, hold)
                continue
            await http.put(url + "/_sim/faults", json=plan)
            if hold:
                await asyncio.sleep(hold)
                await http.delete(url + "/_sim/faults")

    async def send_bad_inputs(self, http: httpx.AsyncClient, gateway: str) -> None:
        i = 0
        while not self.done.is_set():
            name, body = BAD_INPUTS[i % len(BAD_INPUTS)]
            i += 1
            try:
                r = await http.post(
                    gateway + "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
                )
                shaped = set(r.json().get("error", {})) >= {"message", "type", "param", "code"}
                if not (400 <= r.status_code < 500 and shaped):
                    self.bad_input_wrong.append(f"{name}: HTTP {r.status_code} {r.text[:200]}")
            except (httpx.HTTPError, ValueError) as exc:
                self.bad_input_wrong.append(f"{name}: {type(exc).__name__} {exc}")
            self.bad_inputs[name] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), 0.5)

    async def hang_up(self, http: httpx.AsyncClient, gateway: str) -> None:
        body = {"model": MODEL, "prompt": "x" * 2000, "max_tokens": 200, "ignore_eos": True, "stream": True}
        while not self.done.is_set():
            with contextlib.suppress(httpx.HTTPError, TimeoutError):
                async with asyncio.timeout(self.rng.uniform(0.05, 1.0)):
                    async with http.stream("POST", gateway + "/v1/completions", json=body) as r:
                        async for _ in r.aiter_bytes():
                            pass
            self.disconnects += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), 1.0)

    async def sample_memory(self, pid: int, t0: float) -> None:
        while not self.done.is_set():
            self.memory.append((time.monotonic() - t0, rss_kib(pid)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), 5.0)


class SoakProcesses(Processes):
    """:class:`Processes` that can kill an engine and start it again on the same port."""

    def kill_and_restart(self, url: str, down_s: float) -> None:
        port = url.rsplit(":", 1)[1]
        for proc in self.procs:
            args = cast("list[str]", proc.args)  # Processes.start runs a list of strings
            if proc.poll() is None and "--port" in args and args[args.index("--port") + 1] == port:
                proc.kill()
                proc.wait()
                time.sleep(down_s)
                self.start(list(args), url, "/health")
                return
        raise RuntimeError(f"no running engine on {url}")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    full = load_trace(resolve_trace(args.trace))
    trace = window(full, 0.0, args.minutes * 60)
    trace = [dataclasses.replace(r, output_tokens=max(1, min(r.output_tokens, args.max_output))) for r in trace]
    with SoakProcesses() as procs, tempfile.TemporaryDirectory() as tmp:
        engines = start_engines(procs, ["sglang", "vllm"], args.dp_size, args.speed, MODEL)
        port = free_port()
        config = {
            "policy": args.policy,
            "port": port,
            "max_body_bytes": 1024 * 1024,
            "engines": engines,
            "health": {"probe_interval_s": 0.5, "failure_threshold": 3, "open_s": 1.0},
            "upstream": {"first_byte_timeout_s": 30.0, "idle_timeout_s": 10.0, "total_timeout_s": 300.0},
        }
        path = Path(tmp) / "gateway.yaml"
        path.write_text(yaml.safe_dump(config))
        cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--log-level", "error"]
        gateway = procs.start(cmd, f"http://127.0.0.1:{port}", "/ready")
        pid = procs.procs[-1].pid
        soak = Soak(args, procs, engines)
        print(
            f"soak: {len(trace)} requests ({args.trace}, {args.minutes:g} trace minutes at x{args.rate_scale}, "
            f"output <= {args.max_output} tokens), faults every {args.fault_every:g} s",
            file=sys.stderr,
        )
        t0 = time.monotonic()
        rss_start = rss_kib(pid)
        async with httpx.AsyncClient(timeout=30) as http:
            side = [
                asyncio.create_task(soak.inject_faults(http)),
                asyncio.create_task(soak.send_bad_inputs(http, gateway)),
                asyncio.create_task(soak.hang_up(http, gateway)),
                asyncio.create_task(soak.sample_memory(pid, t0)),
            ]
            result = await replay(
                gateway, trace, model=MODEL, rate_scale=args.rate_scale, progress=sys.stderr.isatty(), timeout_s=300
            )
            soak.done.set()
            await asyncio.gather(*side)
            for engine in engines:  # leave every engine clean before the final checks
                await http.delete(engine["url"] + "/_sim/faults")
            await asyncio.sleep(5.0)
            rss_end = rss_kib(pid)
            gateway_metrics = (await http.get(gateway + "/metrics")).text
            leftovers: dict[str, float] = {
                "gateway_inflight_requests": metric(gateway_metrics, "gateway_inflight_requests"),
                "gateway_window_buffered_requests": metric(gateway_metrics, "gateway_window_buffered_requests"),
            }
            aborted = 0.0
            for engine in engines:
                text = (await http.get(engine["url"] + "/metrics")).text
                if engine["flavor"] == "vllm":
                    busy = metric(text, "vllm:num_requests_running") + metric(text, "vllm:num_requests_waiting")
                    aborted += metric(text, "vllm:request_success_total", finished_reason="abort")
                else:
                    busy = metric(text, "sglang:num_running_reqs") + metric(text, "sglang:num_queue_reqs")
                    aborted += metric(text, "sglang:num_aborted_requests_total")
                leftovers[f"{engine['name']} running+waiting"] = busy
        wall_s = time.monotonic() - t0
    summary = summarize(result)
    lost = {k: v for k, v in summary["failures"].items() if not k.startswith(EXPLICIT_FAILURES)}
    report = {
        "wall_s": round(wall_s, 1),
        "trace_requests": len(trace),
        "completed": summary["completed"],
        "failed_with_explicit_error": sum(v for k, v in summary["failures"].items() if k not in lost),
        "failures": summary["failures"],
        "failure_examples": summary["failure_examples"],
        "lost": sum(lost.values()),
        "lost_reasons": lost,
        "retried": metric(gateway_metrics, "gateway_upstream_retries_total"),
        "upstream_failures": metric_by(gateway_metrics, "gateway_upstream_failures_total", "kind"),
        "rejected": metric_by(gateway_metrics, "gateway_rejected_requests_total", "reason"),
        "aborted_at_engines": aborted,
        "client_disconnects": soak.disconnects,
        "faults_injected": dict(soak.faults_injected),
        "bad_inputs_sent": dict(soak.bad_inputs),
        "bad_inputs_not_4xx": soak.bad_input_wrong,
        "leftovers_after_settle": leftovers,
        "gateway_rss_kib": {"start": rss_start, "end": rss_end, "max": max(m for _, m in soak.memory)},
        "memory_samples": soak.memory,
        "ttft_s": summary["ttft_s"],
        "output_throughput_tok_s": summary["output_throughput_tok_s"],
    }
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default="azure-conv", help="bundled trace name or file [azure-conv]")
    ap.add_argument("--minutes", type=float, default=60.0, help="trace minutes to replay [60]")
    ap.add_argument("--rate-scale", type=float, default=6.0, help="compress arrivals by this factor [6]")
    ap.add_argument("--max-output", type=int, default=24, help="cap on output tokens per request [24]")
    ap.add_argument("--speed", type=float, default=4.0, help="simulated engine clock speed [4]")
    ap.add_argument("--dp-size", type=int, default=4, help="DP ranks per engine [4]")
    ap.add_argument("--policy", default="sbs")
    ap.add_argument("--fault-every", type=float, default=10.0, help="seconds between two faults [10]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", type=Path, default=RESULTS / "soak.json")
    args = ap.parse_args()
    report = asyncio.run(run(args))
    rss = report["gateway_rss_kib"]
    print(
        f"\n{report['trace_requests']} requests in {report['wall_s']:.0f} s: {report['completed']} completed, "
        f"{report['failed_with_explicit_error']} failed with an explicit error, LOST {report['lost']}\n"
        f"failures: {report['failures']}\n"
        f"retried {report['retried']:.0f}, upstream failures {report['upstream_failures']}, "
        f"aborted at engines {report['aborted_at_engines']:.0f}, client disconnects {report['client_disconnects']}\n"
        f"faults injected: {sum(report['faults_injected'].values())} ({len(report['faults_injected'])} kinds); "
        f"bad inputs: {sum(report['bad_inputs_sent'].values())} sent, {len(report['bad_inputs_not_4xx'])} not a 4xx\n"
        f"left over after settling: {report['leftovers_after_settle']}\n"
        f"gateway RSS: {rss['start'] / 1024:.1f} MiB at start, {rss['end'] / 1024:.1f} MiB at end, "
        f"max {rss['max'] / 1024:.1f} MiB"
    )
    write_report(args, **report)


if __name__ == "__main__":
    main()
