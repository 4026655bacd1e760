"""Our gateway against a real peer router, sglang-router (PyPI, Rust, DP-aware), over HTTP on the same work.

Installs ``sglang-router`` into its own virtual environment (``bench/.venv-sglang-router``, reused on later
runs), then for each contender starts fresh SGLang-flavoured simulated engines, the router or gateway in front
of them, and replays the same trace slice through it:

- ``sglang-router round_robin --dp-aware`` and ``sglang-router power_of_two --dp-aware``: the router discovers
  each engine's DP size from ``GET /get_server_info``, polls ``GET /get_load`` (power of two) and pins ranks
  with ``data_parallel_rank`` in the body, all of which the SGLang-flavoured mock engine answers;
- ``gateway <policy>`` for each policy asked (default ``sbs`` and ``round_robin``).

    .venv/bin/python bench/peer_router.py --minutes 3 --rate-scale 0.6 --speed 0.2

prints one table and writes ``bench/results/peer_router.json``.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from _harness import (
    RESULTS,
    Processes,
    add_slice_args,
    peer_venv,
    replay_through,
    results_table,
    slice_load,
    start_gateway,
    write_report,
)

from gateway.sim.cluster import free_port
from gateway.workload.traces import load_trace, resolve_trace, window

ROUTER_VENV = Path(__file__).parent / ".venv-sglang-router"
ROUTER_PACKAGE = "sglang-router==0.3.2"
"""The version this comparison was written against (the newest on PyPI on 2026-11-22)."""


def router_python() -> Path:
    """The router venv's interpreter, creating the venv and installing sglang-router the first time."""
    return peer_venv(ROUTER_VENV, ROUTER_PACKAGE) / "python"


def start_router(procs: Processes, engines: list[dict[str, object]], policy: str) -> str:
    port = free_port()
    cmd = [str(router_python()), "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--worker-urls", *[str(e["url"]) for e in engines], "--policy", policy, "--dp-aware"]
    cmd += ["--log-level", "warn", "--request-timeout-secs", "1800", "--disable-retries"]
    return procs.start(cmd, f"http://127.0.0.1:{port}", "/health")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_slice_args(ap, minutes=3.0)
    ap.add_argument("--router-policies", default="round_robin,power_of_two", help="sglang-router policies")
    ap.add_argument(
        "--gateway-policies",
        default="sbs,round_robin",
        help="our gateway's policies, each with any +flag/-flag of the window configuration (sbs+step_aligned_close)",
    )
    ap.add_argument(
        "--load",
        type=float,
        help="offered load as a fraction of the slice's analytic capacity; sets --rate-scale for this slice (0.8)",
    )
    ap.add_argument("--output", type=Path, default=RESULTS / "peer_router.json")
    args = ap.parse_args()

    router_python()
    full = load_trace(resolve_trace(args.trace))
    trace = window(full, args.start, args.minutes * 60)
    load = slice_load(trace, args.rate_scale / args.speed, args.instances, args.dp_size).load
    if args.load is not None:  # the load is proportional to the rate scale: arrivals compress, the work does not
        args.rate_scale *= args.load / load
        load = slice_load(trace, args.rate_scale / args.speed, args.instances, args.dp_size).load
    print(f"{len(trace)} requests, rate x{args.rate_scale:.3f}, offered load {load:.0%} of capacity", file=sys.stderr)
    routers, gateways = (filter(None, a.split(",")) for a in (args.router_policies, args.gateway_policies))
    fronts = {f"sglang-router {p} --dp-aware": partial(start_router, policy=p) for p in routers}
    fronts |= {f"gateway {p}": partial(start_gateway, policy=p) for p in gateways}
    results = {}
    for name, front in fronts.items():
        print(f"\n== {name}", file=sys.stderr)
        results[name] = replay_through(front, ["sglang"] * args.instances, trace, args)
    print("\n" + results_table(results))
    write_report(args, router=ROUTER_PACKAGE, requests=len(trace), offered_load=load, runs=results)


if __name__ == "__main__":
    main()
