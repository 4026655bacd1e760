"""Policies side by side in virtual time: one simulated run per policy on the same trace, timed, and a one-line
summary of each (what ``gateway simulate`` prints; the benchmarks under ``bench/`` run their variants the same
way)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from tqdm import tqdm

from gateway.config import PolicyName
from gateway.sim.simulate import SimConfig, Slo, simulate
from gateway.workload.traces import TraceRequest


def timed_summary(
    requests: list[TraceRequest], config: SimConfig, slo: Slo, on_done: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Simulate ``requests`` under ``config``; the run's summary (:meth:`SimResult.summary` against ``slo``) with
    ``wall_s`` added, the wall-clock seconds the run took.

    Args:
        on_done: called with 1 each time a request finishes (a progress bar's ``update``).
    """
    started = time.perf_counter()
    summary = simulate(requests, config, on_done=on_done).summary(slo)
    summary["wall_s"] = time.perf_counter() - started
    return summary


def compare_policies(
    requests: list[TraceRequest],
    policies: Iterable[PolicyName],
    base: SimConfig,
    slo: Slo,
    *,
    progress: bool = False,
    on_result: Callable[[PolicyName, dict[str, Any]], None] = lambda policy, summary: None,
) -> dict[str, dict[str, Any]]:
    """Simulate ``requests`` once per policy, each with ``base`` but for its policy.

    Args:
        requests: the trace, already windowed and rescaled.
        policies: the policies, in the order to run them.
        base: the cluster, window and simulator settings every run shares (its own ``policy`` is ignored).
        slo: the objective each summary's SLO attainment and goodput are judged against.
        progress: show a progress bar per run on stderr.
        on_result: called with each policy and its summary as soon as its run ends.

    Returns:
        Policy → its :func:`timed_summary`, in run order.
    """
    results: dict[str, dict[str, Any]] = {}
    for policy in policies:
        bar = tqdm(total=len(requests), desc=policy, unit="req", file=sys.stderr, disable=not progress, leave=False)
        with bar:
            summary = timed_summary(requests, replace(base, policy=policy), slo, on_done=bar.update)
        results[policy] = summary
        on_result(policy, summary)
    return results


def summary_line(policy: str, summary: dict[str, Any]) -> str:
    """One line of a :func:`timed_summary`: requests completed, TTFT p50 and p99, TPOT mean (– when no request
    had two tokens), output throughput and the run's wall time."""
    ttft, tpot = summary["ttft_s"], summary["tpot_s"]
    tpot_mean = "–" if tpot["mean"] is None else f"{tpot['mean'] * 1000:.1f}"
    return (
        f"{policy:<15} completed {summary['completed']:>6}  TTFT p50 {ttft['p50']:.3f} s  p99 {ttft['p99']:.3f} s  "
        f"TPOT mean {tpot_mean} ms  output {summary['output_throughput_tok_s']:.0f} tok/s  "
        f"({summary['wall_s']:.1f} s wall)"
    )
