"""Our gateway against peer P/D routers over HTTP, in front of the same simulated P/D engines, on the same work.

Part 1, SGLang's bootstrap protocol: the SGLang Model Gateway (``smg`` 1.13 from PyPI, in ``bench/.venv-smg``)
with ``--pd-disaggregation --dp-aware`` against the gateway, both before SGLang-flavoured P/D mocks (``gateway
mock-engine --flavor sglang --role prefill|decode``; by default 2 prefill mocks of 4 DP ranks and 1 decode mock of
8). smg 1.13 sends each leg with ``bootstrap_host``, ``bootstrap_port`` and a random ``bootstrap_room``; under
``--dp-aware`` the prefill leg gets ``routed_dp_rank = p`` and the decode leg ``routed_dp_rank = d`` and
``disagg_prefill_dp_rank = p`` (``model_gateway/src/routers/http/pd_router.rs``), so the prefill leg pins a rank
the random room does not imply. SGLang 0.5.23 resolves a P/D prefill's ``--load-balance-method auto`` to
``follow_bootstrap_room`` and then refuses such a request, unless the request itself carries
``disagg_prefill_dp_rank`` (``disaggregation/prefill.py`` ``create_sender``, ``common/conn.py``
``CommonKVSender.__init__``): "follow_bootstrap_room conflict ... Set
SGLANG_DISAGGREGATION_FORCE_QUERY_PREFILL_DP_RANK=1 to allow mixed routing". The script first shows that (a few
requests through smg before prefill mocks as shipped: ``conflict_probe`` in the JSON), then runs every contender
before prefill mocks started with ``--force-query-prefill-dp-rank`` (that setting, which the engine's message
names), so that smg can run at all. The gateway aligns the room to its prefill rank and runs the same either way.

- smg: each ``--prefill-policy`` x ``--decode-policy`` of ``--smg-policies`` (``cache_aware``, ``least_load``)
  with ``--dp-aware``, first on a short slice (``--pick-minutes``); the one with the lowest TTFT mean and no
  failure then runs the full slice. Retries are off (a failure counts); the rest is smg's defaults.
- gateway: ``sbs`` (the window and allocator on the prefill leg, the decode allocation on the decode leg) and
  smg's chosen pair as the gateway implements it (``pd.prefill_policy`` / ``pd.decode_policy``), like for like.

Part 2, vLLM's NixlConnector (sequential: prefill, then decode with the ``kv_transfer_params`` it returned):
``vllm-router`` (PyPI, vllm-project/router; ``bench/.venv-vllm-router``) with ``--vllm-pd-disaggregation
--kv-connector nixl --intra-node-data-parallel-size <prefill DP>`` (each leg pinned by ``X-data-parallel-rank``)
against the gateway ``sbs``, before vLLM-flavoured NIXL mocks of the same shape; vllm-router's policies are
picked the same way from ``--vllm-router-pairs`` (a pair the router refuses to start with is listed as
refused).

After each replay the script waits (at most 60 s) for both pools to drain and asks every engine what it saw
(``GET /_sim/requests``: requests pinned to each DP rank or placed by the engine, KV transfers completed and
failed, requests still running or holding KV, load polls served); the JSON keeps it under each run's ``probe``.

    .venv/bin/python bench/smg_pd.py --minutes 3 --pick-minutes 1 --rate-scale 3.0 --speed 0.4

prints one table and writes ``bench/results/smg_pd.json`` and ``.md``; the Mooncake run (SGLang part only, engines
as shipped with their prefix caches, prompts sharing text where the trace's hash_ids share blocks):

    .venv/bin/python bench/smg_pd.py --parts sglang --trace mooncake-conv --start 120 --minutes 1 \\
        --pick-minutes 0.25 --rate-scale 0.25 --speed 1 --engine-profile as-shipped \\
        --output bench/results/smg_pd_mooncake.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import yaml
from _harness import RESULTS, Processes, add_slice_args, peer_venv, replay_through, results_table, slice_load

from gateway.sim.cluster import NotReady, free_port
from gateway.workload.traces import TraceRequest, load_trace, resolve_trace, window

SMG_VENV = Path(__file__).parent / ".venv-smg"
SMG_PACKAGE = "smg==1.13.*"
"""The release this comparison was written against (smg 1.13.0, the newest on PyPI in December 2026)."""
VLLM_ROUTER_VENV = Path(__file__).parent / ".venv-vllm-router"
VLLM_ROUTER_PACKAGE = "vllm-router==0.1.17"
"""vllm-project/router's wheel, the newest on PyPI in December 2026."""
SETTLE_S = 60.0
"""Longest wait after a replay for both pools to have nothing running or held, wall seconds."""

Front = Callable[[Processes, list[dict[str, Any]]], str]


def pd_cluster(procs: Processes, args: argparse.Namespace, protocol: str, force_query: bool) -> list[dict[str, Any]]:
    """Start the P/D mocks (``--instances`` prefill mocks of ``--dp-size`` ranks, ``--decode-instances`` decode
    mocks of ``--decode-dp-size``) speaking ``protocol`` (``sglang`` or ``nixl``); return their gateway engine
    configurations (an SGLang prefill's bootstrap server is its HTTP port, see ``gateway.sim.mock_engine.pd``)."""
    flavor = "sglang" if protocol == "sglang" else "vllm"
    tokenizer = "deepseek" if args.prompts == "tokenizer" else "estimate"
    engines = []
    pools = [("prefill", args.instances, args.dp_size), ("decode", args.decode_instances, args.decode_dp_size)]
    for role, count, dp_size in pools:
        for i in range(count):
            port = free_port()
            cmd = [sys.executable, "-m", "gateway", "mock-engine", "--flavor", flavor, "--role", role]
            cmd += ["--dp-size", str(dp_size), "--port", str(port), "--model", args.model, "--speed", str(args.speed)]
            cmd += ["--profile", args.engine_profile, "--tokenizer", tokenizer]
            if flavor == "vllm":
                cmd += ["--kv-connector", protocol]
            if flavor == "sglang" and role == "prefill" and force_query:
                cmd += ["--force-query-prefill-dp-rank"]
            url = procs.start(cmd, f"http://127.0.0.1:{port}", "/health")
            engine: dict[str, Any] = {
                "name": f"{role[0]}{i}",
                "flavor": flavor,
                "url": url,
                "dp_size": dp_size,
                "models": [args.model],
                "role": role,
            }
            if flavor == "vllm":
                engine["kv_connector"] = protocol
            elif role == "prefill":
                engine |= {"bootstrap_host": "127.0.0.1", "bootstrap_port": port}
            engines.append(engine)
    return engines


def _wait_ready(url: str, ranks: int, log: Path) -> None:
    deadline = time.monotonic() + 60  # workers register in the background after the port opens
    while httpx.get(url + "/readiness", timeout=5).json().get("healthy_workers", 0) < ranks:
        if time.monotonic() > deadline:
            raise RuntimeError(f"smg has fewer than {ranks} healthy DP-rank workers after 60 s (log: {log})")
        time.sleep(0.1)


def start_smg(procs: Processes, engines: list[dict[str, Any]], prefill: str, decode: str, log: Path) -> str:
    """Start ``smg launch --pd-disaggregation --prefill-policy prefill --decode-policy decode --dp-aware`` in front
    of ``engines``; return its URL once every DP rank of every engine is a healthy worker."""
    port, metrics_port = free_port(), free_port()
    cmd = [str(peer_venv(SMG_VENV, SMG_PACKAGE) / "smg"), "launch", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--pd-disaggregation"]
    for e in engines:
        cmd += ["--prefill", e["url"], str(e["bootstrap_port"])] if e["role"] == "prefill" else ["--decode", e["url"]]
    cmd += ["--prefill-policy", prefill, "--decode-policy", decode, "--dp-aware"]
    cmd += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]
    cmd += ["--log-level", "info", "--request-timeout-secs", "1800", "--disable-retries"]
    cmd += ["--shutdown-grace-period-secs", "1"]
    url = procs.start(cmd, f"http://127.0.0.1:{port}", "/readiness", log=log)
    _wait_ready(url, sum(int(e["dp_size"]) for e in engines), log)
    return url


def start_vllm_router(procs: Processes, engines: list[dict[str, Any]], prefill: str, decode: str, log: Path) -> str:
    """Start ``vllm-router --vllm-pd-disaggregation --kv-connector nixl`` in front of ``engines`` with
    ``--intra-node-data-parallel-size`` = the prefill mocks' DP size; return its URL once it answers."""
    port, metrics_port = free_port(), free_port()
    bin_dir = peer_venv(VLLM_ROUTER_VENV, VLLM_ROUTER_PACKAGE)
    dp = {int(e["dp_size"]) for e in engines if e["role"] == "prefill"}
    cmd = [str(bin_dir / "vllm-router"), "--host", "127.0.0.1", "--port", str(port), "--vllm-pd-disaggregation"]
    for e in engines:
        cmd += ["--prefill", e["url"]] if e["role"] == "prefill" else ["--decode", e["url"]]
    cmd += ["--prefill-policy", prefill, "--decode-policy", decode, "--kv-connector", "nixl"]
    cmd += ["--intra-node-data-parallel-size", str(max(dp))]
    cmd += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]
    cmd += ["--log-level", "info", "--request-timeout-secs", "1800", "--disable-retries"]
    return procs.start(cmd, f"http://127.0.0.1:{port}", "/health", log=log)


def gateway_config(
    engines: list[dict[str, Any]], policy: str, prefill: str | None, decode: str | None
) -> dict[str, Any]:
    """The gateway's YAML configuration: ``policy``, and each leg's policy where given (``pd.prefill_policy``,
    ``pd.decode_policy``; unset, ``policy`` decides, :class:`gateway.config.PdConfig`)."""
    pd = {k: v for k, v in (("prefill_policy", prefill), ("decode_policy", decode)) if v is not None}
    return {"policy": policy, **({"pd": pd} if pd else {}), "engines": engines}


def start_gateway(
    procs: Processes, engines: list[dict[str, Any]], policy: str, prefill: str | None, decode: str | None
) -> str:
    """Start ``gateway serve`` in front of ``engines`` (see :func:`gateway_config`); return its URL."""
    port = free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(gateway_config(engines, policy, prefill, decode), f)
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", f.name, "--port", str(port), "--log-level", "warning"]
    return procs.start(cmd, f"http://127.0.0.1:{port}", "/ready")


def what_engines_saw(engines: list[dict[str, Any]], front_url: str, settle_s: float = SETTLE_S) -> dict[str, Any]:
    """Each engine's ``/_sim/requests`` once nothing runs or is held on any of them (or after ``settle_s``), keyed
    by engine name, with its role."""
    deadline = time.monotonic() + settle_s
    while True:
        seen = {e["name"]: httpx.get(f"{e['url']}/_sim/requests", timeout=10).json() for e in engines}
        if not any(sum(s["running"]) + sum(s["held"]) for s in seen.values()) or time.monotonic() > deadline:
            return {e["name"]: {"role": e["role"], **seen[e["name"]]} for e in engines}
        time.sleep(0.5)


def pools(probe: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per pool (``prefill``, ``decode``): requests per DP rank (``engine:rank`` → pinned + placed), how many of
    them the engine placed itself, KV transfers completed and failed, requests still running or holding KV, load
    polls served (``/v1/loads``, ``/get_load``, ``/metrics``), and prompt tokens looked up in and found in the
    ranks' prefix caches (the as-shipped profile)."""
    out: dict[str, dict[str, Any]] = {}
    for name, seen in probe.items():
        if not isinstance(seen, dict) or "role" not in seen:
            continue
        pool = out.setdefault(
            seen["role"],
            {"per_rank": {}, "placed": 0, "completed": 0, "failed": 0, "running": 0, "held": 0, "load_polls": 0}
            | {"prefix_queries": 0, "prefix_hits": 0},
        )
        for rank, (pinned, placed) in enumerate(zip(seen["pinned"], seen["placed"], strict=True)):
            pool["per_rank"][f"{name}:{rank}"] = pinned + placed
        pool["placed"] += sum(seen["placed"])
        pool["completed"] += sum(seen.get("transfers_completed", []))
        pool["failed"] += sum(seen.get("transfers_failed", []))
        pool["running"] += sum(seen["running"])
        pool["held"] += sum(seen["held"])
        pool["load_polls"] += sum(seen.get("polls", {}).values())
        pool["prefix_queries"] += sum(seen.get("prefix_cache_queries", []))
        pool["prefix_hits"] += sum(seen.get("prefix_cache_hits", []))
    return out


def offered_load(trace: list[TraceRequest], args: argparse.Namespace) -> float:
    """The slice's load on the cluster's ranks run as mixed engines of the prefill mocks' DP size (a scale for the
    reader, :func:`_harness.slice_load`; the engine model's capacity of a rank depends on its instance's DP size,
    and a P/D pool's differs from a mixed one's)."""
    ranks = args.instances * args.dp_size + args.decode_instances * args.decode_dp_size
    return slice_load(trace, args.rate_scale / args.speed, ranks // args.dp_size, args.dp_size).load


def pick(results: dict[str, dict[str, Any]]) -> str | None:
    """The run with the lowest TTFT mean among those with no failure and at least one completed request."""
    clean = {n: s for n, s in results.items() if s["failed"] == 0 and s["completed"] > 0}
    return min(clean, key=lambda n: clean[n]["ttft_s"]["mean"]) if clean else None


def conflict_probe(args: argparse.Namespace, prefill: str, decode: str, requests: int = 16) -> dict[str, Any]:
    """``requests`` sequential requests through smg ``--dp-aware`` before SGLang prefill mocks as shipped (no
    ``--force-query-prefill-dp-rank``): how many fail, with the first error, and what the engines saw."""
    logs = RESULTS / "tmp"
    with Processes() as procs:
        engines = pd_cluster(procs, args, "sglang", force_query=False)
        url = start_smg(procs, engines, prefill, decode, logs / "smg_pd_conflict.log")
        body = {"model": args.model, "messages": [{"role": "user", "content": "Hello there."}], "max_tokens": 8}
        statuses, first_error = [], None
        for _ in range(requests):
            answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
            statuses.append(answer.status_code)
            if answer.status_code != 200 and first_error is None:
                first_error = answer.text[:600]
        probe = what_engines_saw(engines, url, settle_s=30)
    return {
        "router": f"smg {prefill}/{decode} --dp-aware",
        "requests": requests,
        "failed": sum(s != 200 for s in statuses),
        "statuses": statuses,
        "first_error": first_error,
        "pools": pools(probe),
    }


def replay(
    name: str, front: Front, trace: list[TraceRequest], args: argparse.Namespace, protocol: str
) -> dict[str, Any]:
    print(f"\n== {name} ({len(trace)} requests)", file=sys.stderr)
    cluster = partial(pd_cluster, args=args, protocol=protocol, force_query=True)
    summary = replay_through(front, [], trace, args, probe=what_engines_saw, cluster=cluster)
    print(f"   {summary['completed']} done, {summary['failed']} failed", file=sys.stderr)
    summary["pools"] = pools(summary["probe"])
    return summary


def pool_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows: per run and pool, requests per DP rank, placed by the engine, KV transfers, left running, load
    polls."""
    lines = [
        "| run | pool | requests per DP rank (engine:rank) | placed by engine | KV transfers ok / failed | "
        "running / holding KV after | load polls served | prefix-cache hits |",
        "|---|---|---|---:|---|---|---:|---:|",
    ]
    for name, summary in results.items():
        for role, pool in summary["pools"].items():
            ranks = " ".join(str(n) for n in pool["per_rank"].values())
            queries = pool["prefix_queries"]
            hits = f"{pool['prefix_hits'] / queries:.1%}" if queries else "–"
            lines.append(
                f"| {name} | {role} | {ranks} | {pool['placed']} | {pool['completed']} / {pool['failed']} "
                f"| {pool['running']} / {pool['held']} | {pool['load_polls']} | {hits} |"
            )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_slice_args(ap, minutes=3.0)
    ap.set_defaults(instances=2, dp_size=4)
    ap.add_argument("--decode-instances", type=int, default=1, help="decode mocks [1] (--instances: prefill mocks)")
    ap.add_argument("--decode-dp-size", type=int, default=8, help="DP ranks per decode mock [8]")
    ap.add_argument("--pick-minutes", type=float, default=1.0, help="slice of the short runs that pick a peer's policy")
    ap.add_argument("--smg-policies", default="cache_aware,least_load", help="smg prefill and decode policies to try")
    ap.add_argument(
        "--vllm-router-pairs",
        default="cache_aware/cache_aware,power_of_two/cache_aware",
        help="vllm-router prefill/decode policy pairs to try (its power_of_two needs 2+ workers on that leg)",
    )
    ap.add_argument("--parts", default="sglang,nixl", help="which parts to run [sglang,nixl]")
    ap.add_argument("--output", type=Path, default=RESULTS / "smg_pd.json")
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md from --output's JSON, run nothing")
    args = ap.parse_args()
    if args.report_only:
        rewrite_report(args.output)
        return

    full = window(load_trace(resolve_trace(args.trace)), args.start, args.minutes * 60)
    short = window(load_trace(resolve_trace(args.trace)), args.start, args.pick_minutes * 60)
    load = offered_load(full, args)
    print(f"{len(full)} requests, offered load {load:.0%} (see offered_load)", file=sys.stderr)
    logs = RESULTS / "tmp"
    logs.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    report: dict[str, Any] = {"requests": len(full), "pick_requests": len(short), "offered_load": load}
    results: dict[str, dict[str, Any]] = {}
    picks: dict[str, dict[str, Any]] = {}

    refused: dict[str, str] = {}

    def peer(part: str, router: str, starter: Callable[..., str], pairs: list[tuple[str, str]]) -> tuple[str, str]:
        """Short runs of each (prefill, decode) policy pair of ``router``; the picked pair runs the full slice."""
        tried: dict[str, dict[str, Any]] = {}
        for p, d in pairs:
            name = f"{router} {p}/{d}"
            front = partial(starter, prefill=p, decode=d, log=logs / f"{router}_pd_{p}_{d}.log")
            try:
                tried[name] = replay(f"pick {name}", front, short, args, part)
            except (RuntimeError, NotReady) as exc:  # the router refused the configuration
                refused[f"{part}: {name}"] = str(exc)
                print(f"   refused: {exc}", file=sys.stderr)
        picks[part] = tried
        best = pick(tried) or next(iter(tried))
        p, d = best.split()[1].split("/")
        front = partial(starter, prefill=p, decode=d, log=logs / f"{router}_pd_{p}_{d}.log")
        results[f"{part}: {best}"] = replay(best, front, full, args, part)
        return p, d

    if "sglang" in parts:
        peer_venv(SMG_VENV, SMG_PACKAGE)
        policies = args.smg_policies.split(",")
        report["conflict_probe"] = conflict_probe(args, policies[0], policies[0])
        print(f"conflict probe: {report['conflict_probe']['failed']} of 16 failed", file=sys.stderr)
        p, d = peer("sglang", "smg", start_smg, list(itertools.product(policies, policies)))
        for policy, prefill, decode in (("sbs", None, None), (p, p, d)):
            name = "gateway sbs" if policy == "sbs" else f"gateway {p}/{d}"
            front = partial(start_gateway, policy=policy, prefill=prefill, decode=decode)
            results[f"sglang: {name}"] = replay(name, front, full, args, "sglang")

    if "nixl" in parts:
        peer_venv(VLLM_ROUTER_VENV, VLLM_ROUTER_PACKAGE)
        pairs = [(p, d) for p, d in (pair.split("/") for pair in args.vllm_router_pairs.split(","))]
        peer("nixl", "vllm-router", start_vllm_router, pairs)
        front = partial(start_gateway, policy="sbs", prefill=None, decode=None)
        results["nixl: gateway sbs"] = replay("gateway sbs", front, full, args, "nixl")
    report["refused"] = refused

    table = results_table(results)
    pick_tables = {part: results_table(runs) for part, runs in picks.items()}
    print("\n" + table)
    command = shlex.join([".venv/bin/python", "bench/smg_pd.py", *sys.argv[1:]])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    routers = {"smg": SMG_PACKAGE, "vllm-router": VLLM_ROUTER_PACKAGE}
    document = {"config": config, "command": command, "routers": routers, **report, "runs": results, "picks": picks}
    args.output.write_text(json.dumps(document, indent=2))
    args.output.with_suffix(".md").write_text(markdown(command, args, report, table, results, pick_tables))
    print(f"\nwrote {args.output}", file=sys.stderr)


def rewrite_report(path: Path) -> None:
    """Rewrite the Markdown note of a finished run from its JSON (the pool counts recomputed from the probes)."""
    document = json.loads(path.read_text())
    args = argparse.Namespace(**document["config"])
    runs, picks = document["runs"], document["picks"]
    for summary in [*runs.values(), *(s for tried in picks.values() for s in tried.values())]:
        summary["pools"] = pools(summary["probe"])
    full = window(load_trace(resolve_trace(args.trace)), args.start, args.minutes * 60)
    document["offered_load"] = offered_load(full, args)
    path.write_text(json.dumps(document, indent=2))
    tables = {part: results_table(tried) for part, tried in picks.items()}
    path.with_suffix(".md").write_text(markdown(document["command"], args, document, results_table(runs), runs, tables))


def markdown(
    command: str,
    args: argparse.Namespace,
    report: dict[str, Any],
    table: str,
    results: dict[str, dict[str, Any]],
    pick_tables: dict[str, str],
) -> str:
    """The run as a short Markdown note: command, tables, what the engines saw, the conflict probe."""
    shape = (
        f"{args.instances} prefill mock(s) of {args.dp_size} DP ranks and {args.decode_instances} decode mock(s) of "
        f"{args.decode_dp_size}"
    )
    lines = [
        "# P/D over HTTP: smg 1.13 and vllm-router against the gateway",
        "",
        f"`{command}`",
        "",
        f"{report['requests']} requests ({args.trace}, {args.minutes:g} min from {args.start:g} s, rate x"
        f"{args.rate_scale:g}, engine clock x{args.speed:g}; offered load {report['offered_load']:.0%} of the same "
        f"ranks run as mixed engines of DP {args.dp_size}), {shape} per protocol, {args.engine_profile} engine "
        "model; fresh processes per run, replay by `gateway bench`, one run each.",
        "",
        "```",
        table,
        "```",
        "",
        "Requests per DP rank as the engines counted them (`/_sim/requests`, pinned by the front or placed by the",
        "engine), KV transfers, and what was still running or holding KV once the pools drained (at most 60 s):",
        "",
        *pool_lines(results),
        "",
    ]
    for part, pick_table in pick_tables.items():
        lines += [
            f"Policy pick ({part}, {report['pick_requests']} requests, {args.pick_minutes:g} min of the same trace;",
            "lowest TTFT mean without failure):",
            "",
            "```",
            pick_table,
            "```",
            "",
        ]
    for name, reason in report.get("refused", {}).items():
        lines += [f"Refused to start: {name}: `{reason}` (see its log under `bench/results/tmp/`).", ""]
    probe = report.get("conflict_probe")
    if probe is not None:
        lines += [
            f"Conflict probe: {probe['router']} before SGLang prefill mocks as shipped (no",
            f"`--force-query-prefill-dp-rank`): {probe['failed']} of {probe['requests']} requests failed.",
            "",
        ]
        if probe["first_error"]:
            lines += ["```", probe["first_error"], "```", ""]
    return "\n".join(lines) + NOTES


NOTES = """
Reading this:

- smg 1.13 `--dp-aware` pins the prefill leg with `routed_dp_rank` and tells only the decode leg
  `disagg_prefill_dp_rank`, with a room drawn at random (captured from the 1.13 wheel before these mocks: prefill
  `{..., "bootstrap_host", "bootstrap_port", "bootstrap_room": 3906424319907634146, "routed_dp_rank": 1}`, decode
  the same room with `"disagg_prefill_dp_rank": 1, "routed_dp_rank": 6`; that room implies prefill rank 2).
  SGLang 0.5.23 resolves a P/D prefill's default `--load-balance-method auto` to `follow_bootstrap_room` and
  refuses a pinned rank the room does not imply unless that prefill request carries `disagg_prefill_dp_rank`
  (`disaggregation/prefill.py` passes `req.disagg_prefill_dp_rank is not None` to `CommonKVSender`): with P
  prefill ranks, (P-1)/P of smg's requests fail (conflict probe above). smg only warns when a prefill with DP > 1
  does *not* report `follow_bootstrap_room` (`workflow/steps/shared/update_policies.rs`). The runs in the table
  therefore use prefill mocks with `--force-query-prefill-dp-rank` (SGLang's
  `SGLANG_DISAGGREGATION_FORCE_QUERY_PREFILL_DP_RANK=1`, which the engine's error names) for every contender; the
  gateway mints a room congruent to its prefill rank and needs no such setting.
- smg and vllm-router both make one worker per DP rank (`http://host:port@rank`) and poll its load on that URL,
  which an HTTP client reads as host `rank`: the polls never reach the engines (last column: smg 0; vllm-router
  only its start-up `/metrics` read of the DP size) and their load-aware policies run on router-side counts (see
  `smg_router.md`; vllm-router at debug level logs "Failed to get load from http://...@0: error sending request
  for url (http://0.0.0.0/get_load)"). The gateway scrapes each engine's `/metrics` every 0.5 s.
- A P/D request's TTFT includes the prefill, the KV handoff (the engine model's bandwidth) and the first decode
  step; on vLLM NIXL the legs are sequential for every router.
- One run each, on a 2-core machine shared with other jobs, and no repeat: a difference of a few per cent is not
  established by this table.
"""


if __name__ == "__main__":
    main()
