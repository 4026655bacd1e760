"""Per-request replay records and their summary. Pure: numbers in, JSON-able dicts and text out.

Metric definitions (the usual serving-benchmark ones, as in vLLM's ``benchmarks/benchmark_serving.py``):

- TTFT: send → first streamed chunk carrying generated text (seconds).
- E2E: send → end of stream (seconds).
- TPOT: ``(e2e - ttft) / (output_tokens - 1)``, for requests with more than one output token (seconds/token).
- ITL: gaps between consecutive text-carrying chunks, pooled over all completed requests (seconds). An engine
  that packs several tokens into one chunk makes ITL a per-chunk, not per-token, figure.
- Throughputs divide totals over completed requests by the wall time from the first send to the last
  completion.

Percentiles interpolate linearly between order statistics (``statistics.quantiles(method="inclusive")``,
numpy's default ``linear``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)
"""Percentiles reported for every latency metric."""


@dataclass
class RequestRecord:
    """What happened to one replayed request. Times are seconds; ``*_at_s`` are offsets from the replay start.

    Attributes:
        index: position in the replayed trace.
        scheduled_at_s: when the trace says it arrives.
        sent_at_s: when it was actually sent (``sent_at_s - scheduled_at_s`` is the scheduling lag).
        done_at_s: when it completed or failed.
        prompt_tokens: prompt tokens asked for (synthesised prompt length).
        requested_output_tokens: ``max_tokens`` asked for.
        ok: the stream ended with ``[DONE]`` and no error.
        error: short failure reason, used as a counting key (``"HTTP 400"``, ``"stream error"``,
            ``"timeout"``, an aiohttp exception name); None when ok.
        error_detail: the server's error message or exception text, truncated; None when ok.
        ttft_s: time to first token; None if no text arrived.
        e2e_s: send to end of stream (or to the failure).
        output_tokens: ``usage.completion_tokens`` when the server sent usage, else text-carrying chunks.
        itl_s: gaps between consecutive text-carrying chunks.
    """

    index: int
    scheduled_at_s: float
    prompt_tokens: int
    requested_output_tokens: int
    sent_at_s: float = 0.0
    done_at_s: float = 0.0
    ok: bool = False
    error: str | None = None
    error_detail: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first, seconds; None unless ok with > 1 output token and a TTFT."""
        if not self.ok or self.ttft_s is None or self.e2e_s is None or self.output_tokens <= 1:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass
class ReplayResult:
    """A finished replay: every launched request's record and the run's settings.

    Attributes:
        records: one per launched request, in trace order.
        wall_s: replay start (first scheduled arrival) to the last completion, seconds.
        url, model, endpoint: where and what was replayed.
        rate_scale: the arrival-time divisor used.
        duration_limit_s: the launch cut-off in wall seconds, None for the whole trace.
        trace_requests: requests in the trace handed to the replay (>= ``len(records)``).
    """

    records: list[RequestRecord]
    wall_s: float
    url: str = ""
    model: str = ""
    endpoint: str = "chat"
    rate_scale: float = 1.0
    duration_limit_s: float | None = None
    trace_requests: int = 0


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Linear-interpolation percentile of already sorted values (``0 <= pct <= 100``).

    Raises:
        ValueError: empty input or ``pct`` out of range.
    """
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0 <= pct <= 100:
        raise ValueError(f"pct must be in [0, 100], got {pct}")
    pos = (len(sorted_values) - 1) * pct / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    """``{"mean", "p50", "p90", "p99", "max"}`` of ``values``; every figure None when empty."""
    keys = ["mean", *(f"p{p}" for p in PERCENTILES), "max"]
    if not values:
        return dict.fromkeys(keys)
    ordered = sorted(values)
    out: dict[str, float | None] = {"mean": math.fsum(ordered) / len(ordered)}
    for p in PERCENTILES:
        out[f"p{p}"] = percentile(ordered, p)
    out["max"] = ordered[-1]
    return out


def summarize(result: ReplayResult) -> dict[str, Any]:
    """JSON-able summary of a replay.

    Keys: ``config`` (url, model, endpoint, rate_scale, duration_limit_s, trace_requests), ``launched``,
    ``completed``, ``failed``, ``failures`` (reason → count), ``failure_examples`` (reason → first detail),
    ``duration_s`` (first send → last completion), ``wall_s``, ``request_throughput_rps``,
    ``output_throughput_tok_s``, ``input_throughput_tok_s`` (None when ``duration_s`` is 0),
    ``total_input_tokens``, ``total_output_tokens``, ``requested_output_tokens`` (over completed requests),
    and distributions (see :func:`distribution`) ``ttft_s``, ``tpot_s``, ``e2e_s``, ``itl_s``,
    ``send_lag_s`` (actual minus scheduled send time).
    """
    records = result.records
    done = [r for r in records if r.ok]
    failures: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for r in records:
        if not r.ok:
            reason = r.error or "unknown"
            failures[reason] += 1
            examples.setdefault(reason, r.error_detail or "")
    duration = max(r.done_at_s for r in records) - min(r.sent_at_s for r in records) if records else 0.0
    total_in = sum(r.prompt_tokens for r in done)
    total_out = sum(r.output_tokens for r in done)

    def per_second(total: float) -> float | None:
        return total / duration if duration > 0 else None

    return {
        "config": {
            "url": result.url,
            "model": result.model,
            "endpoint": result.endpoint,
            "rate_scale": result.rate_scale,
            "duration_limit_s": result.duration_limit_s,
            "trace_requests": result.trace_requests,
        },
        "launched": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "failures": dict(failures.most_common()),
        "failure_examples": examples,
        "duration_s": duration,
        "wall_s": result.wall_s,
        "request_throughput_rps": per_second(len(done)),
        "output_throughput_tok_s": per_second(total_out),
        "input_throughput_tok_s": per_second(total_in),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "requested_output_tokens": sum(r.requested_output_tokens for r in done),
        "ttft_s": distribution([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_s": distribution([t for r in done if (t := r.tpot_s) is not None]),
        "e2e_s": distribution([r.e2e_s for r in done if r.e2e_s is not None]),
        "itl_s": distribution([gap for r in done for gap in r.itl_s]),
        "send_lag_s": distribution([r.sent_at_s - r.scheduled_at_s for r in records]),
    }


def _fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def format_table(summary: dict[str, Any]) -> str:
    """Render :func:`summarize` output as a fixed-width text table; latencies in milliseconds."""
    cfg = summary.get("config", {})
    lines = [
        f"Trace replay: {cfg.get('url', '?')}, model {cfg.get('model', '?')}, {cfg.get('endpoint', '?')}",
        f"{'requests launched':<28}{summary['launched']:>12}",
        f"{'completed':<28}{summary['completed']:>12}",
        f"{'failed':<28}{summary['failed']:>12}",
    ]
    for reason, count in summary["failures"].items():
        lines.append(f"  {reason:<26}{count:>12}")
    lines += [
        f"{'duration (s)':<28}{_fmt(summary['duration_s']):>12}",
        f"{'request throughput (req/s)':<28}{_fmt(summary['request_throughput_rps']):>12}",
        f"{'output throughput (tok/s)':<28}{_fmt(summary['output_throughput_tok_s'], digits=1):>12}",
        f"{'input throughput (tok/s)':<28}{_fmt(summary['input_throughput_tok_s'], digits=1):>12}",
        f"{'output tokens':<28}{summary['total_output_tokens']:>12}",
        "",
        f"{'latency (ms)':<14}" + "".join(f"{k:>11}" for k in ("mean", "p50", "p90", "p99", "max")),
    ]
    for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_s", "E2E")):
        dist = summary[key]
        lines.append(
            f"{label:<14}" + "".join(f"{_fmt(dist[k], 1e3):>11}" for k in ("mean", "p50", "p90", "p99", "max"))
        )
    lag = summary.get("send_lag_s", {})
    if lag.get("max") is not None:
        lines.append(
            f"{'send lag':<14}" + "".join(f"{_fmt(lag[k], 1e3):>11}" for k in ("mean", "p50", "p90", "p99", "max"))
        )
    return "\n".join(lines)
