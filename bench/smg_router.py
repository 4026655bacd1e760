"""Our gateway against the SGLang Model Gateway (``smg`` 1.13 from PyPI, Rust, DP-aware) over HTTP on the same work.

Installs ``smg`` into its own virtual environment (``bench/.venv-smg``, reused on later runs), then for each
contender starts fresh SGLang-flavoured simulated engines, the router or gateway in front of them, and replays the
same trace slice through it:

- ``smg cache_aware --dp-aware`` and ``smg least_load --dp-aware``: smg reads each engine's ``GET /server_info``
  (``dp_size``; times ``attn_dp_size`` when an engine reports it) and makes one worker per DP rank
  (``http://host:port@rank``), pins the rank with ``data_parallel_rank`` in the body, and polls load every
  ``--load-monitor-interval`` (10 s, as shipped) from ``/loads``, then
  ``GET /v1/loads?include=core,disagg,queues,memory``, then ``/metrics`` (smg 1.13
  ``model_gateway/src/worker/monitor.rs``); retries are off, so a failure counts;
- ``gateway <policy>`` for each policy asked (default ``sbs``, and smg's ``least_load`` and ``cache_aware`` as
  the gateway implements them, for a like-for-like check).

After each replay the script asks every engine what it saw (``GET /_sim/requests``: requests per DP rank, pinned
or placed by the engine, and load polls served) and, for smg, what load smg holds (``GET /get_loads``); both go in
the JSON under each run's ``probe``.

    .venv/bin/python bench/smg_router.py --minutes 2.5 --rate-scale 0.6 --speed 0.2

prints one table and writes ``bench/results/smg_router.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
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

SMG_VENV = Path(__file__).parent / ".venv-smg"
SMG_PACKAGE = "smg==1.13.*"
"""The release this comparison was written against (smg 1.13.0, the newest on PyPI in December 2026)."""


def start_smg(procs: Processes, engines: list[dict[str, Any]], policy: str, log: Path) -> str:
    """Start ``smg launch --policy <policy> --dp-aware`` in front of ``engines``; return its URL once it is ready
    and every DP rank of every engine is registered as a worker."""
    port, metrics_port = free_port(), free_port()
    cmd = [str(peer_venv(SMG_VENV, SMG_PACKAGE) / "smg"), "launch", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--worker-urls", *[str(e["url"]) for e in engines], "--policy", policy, "--dp-aware"]
    cmd += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]
    cmd += ["--log-level", "info", "--request-timeout-secs", "1800", "--disable-retries"]
    cmd += ["--shutdown-grace-period-secs", "1"]
    url = procs.start(cmd, f"http://127.0.0.1:{port}", "/readiness", log=log)
    wanted = sum(int(e["dp_size"]) for e in engines)
    deadline = time.monotonic() + 60  # workers register in the background after the port opens
    while httpx.get(url + "/readiness", timeout=5).json().get("healthy_workers", 0) < wanted:
        if time.monotonic() > deadline:
            raise RuntimeError(f"smg has fewer than {wanted} healthy DP-rank workers after 60 s (log: {log})")
        time.sleep(0.1)
    return url


def what_engines_saw(engines: list[dict[str, Any]], front_url: str, *, smg: bool) -> dict[str, Any]:
    """Each engine's ``/_sim/requests`` (requests per DP rank, pinned or placed; load polls served) and, for smg,
    the load smg holds for its workers (its ``/get_loads``)."""
    seen: dict[str, Any] = {str(e["name"]): httpx.get(f"{e['url']}/_sim/requests", timeout=10).json() for e in engines}
    if smg:
        held = httpx.get(front_url + "/get_loads", timeout=10).json()
        seen["smg_get_loads"] = {"dp_rank_count": held.get("dp_rank_count"), "loads": len(held.get("loads", []))}
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_slice_args(ap, minutes=2.5)
    ap.add_argument("--smg-policies", default="cache_aware,least_load", help="smg policies, each run --dp-aware")
    ap.add_argument(
        "--gateway-policies",
        default="sbs,least_load,cache_aware",
        help="our gateway's policies, each with any +flag/-flag of the window configuration (sbs+step_aligned_close)",
    )
    ap.add_argument("--output", type=Path, default=RESULTS / "smg_router.json")
    args = ap.parse_args()

    peer_venv(SMG_VENV, SMG_PACKAGE)
    trace = window(load_trace(resolve_trace(args.trace)), args.start, args.minutes * 60)
    load = slice_load(trace, args.rate_scale / args.speed, args.instances, args.dp_size).load
    print(f"{len(trace)} requests, rate x{args.rate_scale:.3f}, offered load {load:.0%} of capacity", file=sys.stderr)
    logs = RESULTS / "tmp"
    logs.mkdir(parents=True, exist_ok=True)
    smgs, gateways = (list(filter(None, a.split(","))) for a in (args.smg_policies, args.gateway_policies))
    runs: dict[str, tuple[Any, Any]] = {
        f"smg {p} --dp-aware": (
            partial(start_smg, policy=p, log=logs / f"smg_{p}.log"),
            partial(what_engines_saw, smg=True),
        )
        for p in smgs
    }
    runs |= {f"gateway {p}": (partial(start_gateway, policy=p), partial(what_engines_saw, smg=False)) for p in gateways}
    results = {}
    for name, (front, probe) in runs.items():
        print(f"\n== {name}", file=sys.stderr)
        results[name] = replay_through(front, ["sglang"] * args.instances, trace, args, probe=probe)
    table = results_table(results)
    print("\n" + table)
    command = shlex.join([".venv/bin/python", "bench/smg_router.py", *sys.argv[1:]])
    write_report(args, router=SMG_PACKAGE, command=command, requests=len(trace), offered_load=load, runs=results)
    engines = (
        "SGLang-flavoured simulated engines as shipped (a prefix cache per DP rank)"
        if args.engine_profile == "as-shipped"
        else "SGLang-flavoured simulated engines, idealised (no prefix cache)"
    ) + (", prompts of prose counted by DeepSeek-V3's tokenizer" if args.prompts == "tokenizer" else "")
    if any(r.hash_ids for r in trace):
        engines += ", prompts sharing text where the trace's hash_ids share blocks"
    args.output.with_suffix(".md").write_text(markdown(command, len(trace), load, table, results, engines))


NOTES = """
Reading this table:

- smg 1.13 under `--dp-aware` over HTTP does not get engine load: it makes one worker per rank with the URL
  `http://host:port@rank` and its load monitor probes `{worker.url()}/loads`, `/v1/loads?include=...` and
  `/metrics` on that URL (`model_gateway/src/worker/monitor.rs`, `NativeLoadsPath::probe_url` and
  `fetch_http_load_sglang`; `base_url()` is never used there). An HTTP client reads `127.0.0.1:port` as user
  information and `rank` as the host, so the polls go to `0.0.0.0:80` and fail; `/get_loads` on smg stays empty and
  the engines serve no load poll (table above). Without `--dp-aware`, smg polls the same engines' `/v1/loads` and
  holds one load per rank, so the engines' answer is accepted. Under `--dp-aware` both smg policies therefore run on
  router-side state alone: `least_load` on its dispatch tally (trimmed each tick to the requests smg still holds),
  `cache_aware` on in-flight counts. (A listener on port 80 received smg's `GET /v1/loads?include=core,disagg,...`
  with the engine's `host:port` as Basic credentials.)
"""

NO_CACHE_NOTE = """- The simulated engines have no prefix cache here, and the replay's prompts share no prefix (a unique
  tag, then filler; Azure conversation carries no prefix information), so smg's `cache_aware` misses its tree on
  every request and places by load, and no cache-aware policy can show a benefit here.
"""

CACHE_NOTE = """- The simulated engines run as shipped with a prefix cache per DP rank (`--profile as-shipped`), and the
  replay's prompts share text exactly where the trace's `hash_ids` share 512-token blocks, so a request placed on
  a rank that served its conversation's earlier turns skips their prefill. The last column is the share of prompt
  tokens each engine found in its ranks' caches (`/_sim/requests`).
"""


def markdown(
    command: str, requests: int, load: float, table: str, results: dict[str, dict[str, Any]], engines: str
) -> str:
    """The run as a short Markdown note: command, table, and what the engines saw."""
    lines = [
        "# smg 1.13 against the gateway over HTTP",
        "",
        f"`{command}`",
        "",
        f"{requests} requests, offered load {load:.0%} of the engine model's capacity; {engines}; fresh processes per",
        "run, replay by `gateway bench`.",
        "",
        "```",
        table,
        "```",
        "",
        "What the engines saw (`/_sim/requests`: requests pinned to each DP rank by the front, requests the engine",
        "placed itself, load polls served) and, for smg, how many rank loads smg held at the end (`/get_loads`):",
        "",
        "| run | engine | pinned per rank | placed by engine | /v1/loads | /get_load | /metrics | prefix-cache hits |",
        "|---|---|---|---|---|---|---|---:|",
    ]
    for name, summary in results.items():
        probe = dict(summary.get("probe", {}))
        held = probe.pop("smg_get_loads", None)
        for engine, seen in probe.items():
            polls = seen["polls"]
            queries = sum(seen.get("prefix_cache_queries", []))
            hits = f"{sum(seen.get('prefix_cache_hits', [])) / queries:.1%}" if queries else "–"
            lines.append(
                f"| {name} | {engine} | {seen['pinned']} | {sum(seen['placed'])} | {polls['/v1/loads']} "
                f"| {polls['/get_load']} | {polls['/metrics']} | {hits} |"
            )
        if held is not None:
            lines.append(f"| {name} | smg `/get_loads` | {held['loads']} rank loads held | | | | | |")
    return "\n".join(lines) + "\n" + NOTES + (CACHE_NOTE if "prefix cache per DP rank" in engines else NO_CACHE_NOTE)


if __name__ == "__main__":
    main()
