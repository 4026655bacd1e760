"""P/D faults under load: each fault x each protocol, a few hundred requests of a trace slice each
(:mod:`gateway.sim.pd_faults`; the small version is ``tests/e2e/test_pd_faults_load.py``).

For every P/D protocol (SGLang bootstrap, vLLM NIXL, vLLM Mooncake) and every fault (a prefill engine killed, a
decode engine killed, both decode engines killed, KV transfers broken, decode legs breaking after their first
events, streamed clients hanging up, none), the first ``--requests`` requests of a slice of ``--trace`` (slice
``--slice`` of ``--minutes`` minutes, as ``bench/slices.py`` cuts them) go through the gateway, ``--concurrency`` at
a time in arrival order (the trace's arrival times are not kept: a closed loop keeps the run deterministic), half
of them streamed, in front of two prefill and two decode simulated engines of 2 DP ranks; the fault strikes once
``--fault-after`` of them were answered, on an engine serving legs at that moment. Each row gives the requests
sent, completed, answered with an error (by HTTP status; ``stream``: an error event after the first byte), lost
(neither), the P/D leg failures and retries, and what is left on every surviving engine afterwards: requests and
handoffs hanging (must be 0) and KV a vLLM prefill keeps for its lease because its decode never pulled it (vLLM's
own behaviour; nothing the gateway sends frees it).

    .venv/bin/python bench/pd_faults.py       # writes bench/results/pd_faults.{json,md}; about 3 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from _harness import RESULTS

from gateway.sim.pd_faults import FAULTS, PROTOCOLS, Drill, run_drill
from gateway.workload.traces import TraceRequest, load_trace, resolve_trace, window


def trace_slice(args: argparse.Namespace) -> list[TraceRequest]:
    """The first ``args.requests`` requests of slice ``args.slice`` of ``args.minutes`` minutes."""
    full = load_trace(resolve_trace(args.trace))
    sliced = window(full, args.slice * args.minutes * 60, args.minutes * 60)
    return sliced[: args.requests]


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| protocol | fault | sent | completed | errors (by status) | lost | leg failures | retries "
        "| hanging prefill / decode | lease-held KV (prefill) |\n"
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for row in rows:
        left = row["left"]
        hanging = f"{left.get('prefill', {}).get('hanging', 0)} / {left.get('decode', {}).get('hanging', 0)}"
        errors = ", ".join(f"{k}: {v}" for k, v in row["errors_by_status"].items()) or "0"
        disconnected = f" (+{row['disconnected']} hung up)" if row["disconnected"] else ""
        lines.append(
            f"| {row['protocol']} | {row['fault']} | {row['sent']} | {row['completed']}{disconnected} | {errors} "
            f"| {row['lost']} | {row['leg_failures']} | {row['retries']} | {hanging} "
            f"| {left.get('prefill', {}).get('lease_held', 0)} |"
        )
    return head + "\n".join(lines) + "\n"


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    trace = trace_slice(args)
    rows = []
    for protocol in PROTOCOLS:
        for fault in FAULTS:
            drill = Drill(
                protocol,
                fault,
                concurrency=args.concurrency,
                max_output_tokens=args.max_output,
                fault_after=args.fault_after,
                transfer_failures=args.transfer_failures,
                seed=args.seed,
                settle_polls=args.settle_polls,
            )
            started = time.perf_counter()
            result = await run_drill(drill, trace)
            row = result.summary() | {"wall_s": round(time.perf_counter() - started, 1)}
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default="azure-conv")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--slice", type=int, default=1, help="which slice of --minutes (0 = the first)")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=48)
    parser.add_argument("--max-output", type=int, default=64, help="cap on output tokens per request")
    parser.add_argument("--fault-after", type=float, default=0.3)
    parser.add_argument("--transfer-failures", type=int, default=12)
    parser.add_argument("--settle-polls", type=int, default=400, help="x 25 ms: the wait for the engines to empty")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS / "pd_faults.json")
    args = parser.parse_args()
    rows = asyncio.run(run(args))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.output.write_text(json.dumps({"config": config, "rows": rows}, indent=2) + "\n")
    hanging = sum(pool["hanging"] for row in rows for pool in row["left"].values())
    lost = sum(row["lost"] for row in rows)
    command = "    .venv/bin/python bench/pd_faults.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in config.items() if k != "output"
    )
    md = (
        "# P/D faults under load\n\n"
        f"{args.requests} requests of {args.trace} (slice {args.slice} of {args.minutes:g} min), "
        f"{args.concurrency} at a time, half streamed, output capped at {args.max_output} tokens; 2 prefill + 2 "
        "decode simulated engines of 2 DP ranks per protocol; the fault strikes after "
        f"{args.fault_after:.0%} of the answers. Lost requests in all: **{lost}**; requests or handoffs left "
        f"hanging on a surviving engine in all: **{hanging}**.\n\n"
        + table(rows)
        + "\nFaults: `kill_prefill` / `kill_decode` kill one engine of that pool, `kill_all_decode` both decode "
        "engines (no healthy pair left), `transfer_fail` breaks the KV transfer of the next "
        f"{args.transfer_failures} decode legs on one decode engine, `decode_crash` makes the next "
        f"{args.transfer_failures} decode legs on one decode engine break off after their first events, "
        "`disconnect` has a quarter of the streamed clients hang up after their first text. Errors: `stream`, an "
        "error event in a stream whose decode leg broke after its first bytes (the killed decode engine's, or "
        "`decode_crash`; past the first byte nothing can be retried); `502` / `503` / `504`, an OpenAI error body "
        "once every decode engine was dead. Leg failures count every failed leg (`gateway_pd_leg_failures_total`): "
        "those before the client's first byte are retried while a pair is left, a decode stream broken after it "
        "ends with an error event. Hanging: requests running or queued, SGLang prefill legs waiting for their "
        "decode side, handoff state, on every surviving engine once the clients have their answers (the engines "
        "keep their 300 s / 480 s handoff timeouts). Lease-held KV: a vLLM prefill (NIXL, Mooncake) keeps the KV of "
        "a request whose decode failed before pulling it until its lease / abort timeout (vLLM 0.34 "
        "`kv_lease_duration`, `VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT`), as the engine does: nothing the gateway can "
        "send frees it.\n\n"
        f"```\n{command}\n```\n"
    )
    args.output.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
