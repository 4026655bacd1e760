"""Time the immediate policies' per-request placement through the scheduler at cluster scale.

For each immediate policy and 16 (1 x 16), 256 (2 x 128) and 1,152 (8 x 144) DP ranks: 1,000 requests placed one
after another through :meth:`Scheduler.submit <gateway.scheduling.scheduler.Scheduler.submit>` (the load, the
policy's choice, the dispatch record), in microseconds of CPU per request, in two set-ups:

- ``gateway``: the load view as ``gateway serve`` builds it, asking the circuit breakers
  (:class:`~gateway.load.health.HealthBook`) whether each rank is usable (all breakers closed);
- ``sim``: the load view as the simulator builds it, with no breakers.

The cluster, its loads, the step clock, the prefix index and the requests are those of
``bench/allocation_scale.py`` (seeded; 60% of the requests continue one of 64 conversations). One request is
placed before the clock starts, so what a policy builds once (``prefix_hash``'s ring: 150 BLAKE2b positions per
rank; the per-model indexes) is not counted. Each cell is the median of ``--repeat`` runs of the process's CPU
time (:func:`time.process_time`).

    python bench/immediate_scale.py                     # bench/results/immediate_scale.{json,md}
    python bench/immediate_scale.py --profile least_load 2x128   # cProfile of one cell instead

The figures before the live ranks (``--before``, ``immediate_scale_before.json``) are this script run on the
code before them (the commands are in the notes of ``immediate_scale.md``).
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import json
import pstats
import statistics
import time
from pathlib import Path
from typing import Any

from allocation_scale import IMMEDIATE, NOW, azure_prompts, engine_specs, load_cluster, make_batch

from gateway.config import DecodeConfig, HealthConfig, PhaseAwareConfig, PrefixCacheConfig, WindowConfig
from gateway.load.health import HealthBook
from gateway.load.view import LoadView
from gateway.scheduling.scheduler import Scheduler
from gateway.types import PendingRequest, RankKey

RESULTS = Path(__file__).parent / "results"
SHAPES = ((1, 16), (2, 128), (8, 144))
REQUESTS = 1_000
SETUPS = ("gateway", "sim")


def build(policy: str, shape: tuple[int, int], setup: str, prompts: list[int]) -> Scheduler:
    """A loaded scheduler of ``policy`` over ``shape`` (instances, DP size) in ``setup`` (module docstring)."""
    specs = engine_specs(*shape)
    options: dict[str, Any] = {}
    if setup == "gateway":
        health = HealthBook([RankKey(s.name, r) for s in specs for r in range(s.dp_size)], HealthConfig())
        options["usable"] = health.usable
        if "unsure" in inspect.signature(LoadView).parameters:  # the breakers' shortcut, where the view has it
            options["unsure"] = health.unsure
    view = LoadView(specs, stale_after_s=5.0, **options)
    scheduler = Scheduler(
        policy,
        view,
        window=WindowConfig(),
        allocator=PhaseAwareConfig(),
        decode=DecodeConfig(),
        prefix_cache=PrefixCacheConfig(),
    )
    assert scheduler.prefix is not None
    load_cluster(view, prompts, 1, scheduler.step_clock, scheduler.prefix)
    return scheduler


def requests(prompts: list[int]) -> list[PendingRequest]:
    """The warm-up request and the :data:`REQUESTS` timed ones, all arriving at ``NOW``."""
    batch = make_batch(prompts, REQUESTS + 1, seed=2)
    return [
        PendingRequest(r.request_id, r.model, r.prompt_tokens, 256, NOW, prefix_blocks=r.prefix_blocks) for r in batch
    ]


def cell(policy: str, shape: tuple[int, int], setup: str, prompts: list[int], repeat: int) -> dict[str, Any]:
    """Microseconds of CPU per request of ``policy`` over ``shape`` in ``setup``."""
    times = []
    for _ in range(repeat):
        scheduler = build(policy, shape, setup, prompts)
        warm, *timed = requests(prompts)
        scheduler.submit(warm, NOW)
        start = time.process_time()
        for request in timed:
            scheduler.submit(request, NOW)
        times.append((time.process_time() - start) * 1e6 / len(timed))
    return {
        "policy": policy,
        "shape": f"{shape[0]}x{shape[1]}",
        "ranks": shape[0] * shape[1],
        "setup": setup,
        "requests": REQUESTS,
        "submit_us": round(statistics.median(times), 2),
        "runs": repeat,
    }


def profile(policy: str, shape: tuple[int, int], setup: str, prompts: list[int]) -> None:
    """Print the functions that take the most time placing the requests of one cell."""
    scheduler = build(policy, shape, setup, prompts)
    warm, *timed = requests(prompts)
    scheduler.submit(warm, NOW)
    profiler = cProfile.Profile()
    profiler.enable()
    for request in timed:
        scheduler.submit(request, NOW)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--policies", default=",".join(IMMEDIATE), help="comma-separated immediate policies")
    parser.add_argument("--profile", nargs=2, metavar=("POLICY", "SHAPE"), help="profile one cell (e.g. 2x128)")
    parser.add_argument("--setup", choices=SETUPS, default="gateway", help="the set-up --profile runs")
    parser.add_argument("--json", type=Path, default=RESULTS / "immediate_scale.json")
    parser.add_argument("--before", type=Path, default=RESULTS / "immediate_scale_before.json")
    parser.add_argument("--md", type=Path, default=RESULTS / "immediate_scale.md")
    parser.add_argument("--no-md", action="store_true")
    args = parser.parse_args()
    prompts = azure_prompts()
    if args.profile:
        instances, dp = (int(x) for x in args.profile[1].split("x"))
        profile(args.profile[0], (instances, dp), args.setup, prompts)
        return
    rows = []
    print(f"{'policy':<22}{'shape':>8}{'setup':>9}{'submit us/req':>15}")
    for policy in args.policies.split(","):
        for shape in SHAPES:
            for setup in SETUPS:
                row = cell(policy, shape, setup, prompts, args.repeat)
                rows.append(row)
                print(f"{policy:<22}{row['shape']:>8}{setup:>9}{row['submit_us']:>15.1f}", flush=True)
    args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if not args.no_md:
        before = json.loads(args.before.read_text()) if args.before.exists() else []
        notes = ""
        if args.md.exists() and NOTES in (text := args.md.read_text()):
            notes = text[text.index(NOTES) :]
        args.md.write_text(markdown(rows, before) + (f"\n{notes}" if notes else ""))


NOTES = "<!-- notes: kept when the tables are rewritten -->"
"""The line of ``immediate_scale.md`` from which on the text is written by hand and kept by a rerun."""


def markdown(rows: list[dict[str, Any]], before: list[dict[str, Any]]) -> str:
    """The results table: per policy and rank count, before → after in each set-up."""
    old = {(r["policy"], r["shape"], r["setup"]): r["submit_us"] for r in before}
    new = {(r["policy"], r["shape"], r["setup"]): r["submit_us"] for r in rows}
    lines = [
        "# Immediate policies at cluster scale",
        "",
        "`python bench/immediate_scale.py` (module docstring: inputs, what is timed). "
        f"{REQUESTS:,} requests placed one after",
        "another through `Scheduler.submit`; CPU microseconds per request, median of 3 runs. *before*: the same",
        "script on the code before the live ranks (`immediate_scale_before.json`). `gateway`: the load view asks",
        "the circuit breakers whether a rank is usable (as `gateway serve`); `sim`: no breakers (as the simulator).",
        "",
        "| policy | ranks | gateway before µs | gateway after µs | sim before µs | sim after µs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    seen = []
    for r in rows:
        if (r["policy"], r["shape"]) not in seen:
            seen.append((r["policy"], r["shape"]))
    for policy, shape in seen:
        ranks = next(r["ranks"] for r in rows if r["policy"] == policy and r["shape"] == shape)
        figures = []
        for setup in SETUPS:
            b, a = old.get((policy, shape, setup)), new.get((policy, shape, setup))
            figures += ["" if b is None else f"{b:,.1f}", "" if a is None else f"{a:,.1f}"]
        lines.append(f"| {policy} | {ranks:,} | " + " | ".join(figures) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
