"""Request traces: load the public LLM-serving traces and cut them to shape. Pure: no network, no clock.

A trace is a list of :class:`TraceRequest` sorted by arrival, the first at 0 s. Two formats are read (see
``gateway/data/traces/README.md`` for sources and licenses):

- Azure LLM inference trace 2023 (Splitwise, ISCA'24), CSV with header
  ``TIMESTAMP,ContextTokens,GeneratedTokens``; ``TIMESTAMP`` is wall clock ``YYYY-MM-DD HH:MM:SS.fffffff``
  with seven fractional digits (100 ns), one more than :func:`datetime.strptime` accepts, so the fraction
  is parsed separately.
- Mooncake FAST'25 traces (Kimi), JSONL with ``timestamp`` (ms from trace start), ``input_length``,
  ``output_length`` and ``hash_ids`` (one id per 512-token block of the prompt, equal ids for equal prefixes;
  kept as :attr:`TraceRequest.hash_ids`). Azure traces carry no prompt content, so their ``hash_ids`` are empty.

Bundled traces are addressed by name through :func:`resolve_trace`: ``azure-conv``, ``azure-code``,
``mooncake-conv``.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

BUNDLED_TRACES: dict[str, tuple[str, str]] = {
    "azure-conv": ("azure2023", "AzureLLMInferenceTrace_conv.csv"),
    "azure-code": ("azure2023", "AzureLLMInferenceTrace_code.csv"),
    "mooncake-conv": ("mooncake", "conversation_trace.jsonl"),
}
"""Bundled trace name → (folder, file) under ``gateway/data/traces``."""

_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_MOONCAKE_KEYS = ("timestamp", "input_length", "output_length")


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace.

    Attributes:
        arrival_s: arrival time in seconds, relative to the trace's first request (or to the window start
            after :func:`window`).
        prompt_tokens: prompt (context) tokens, >= 1.
        output_tokens: tokens to generate, >= 1.
        hash_ids: the prompt's block ids, one per 512-token block (Mooncake's ``hash_ids``; the simulator
            passes them on as :attr:`gateway.types.PendingRequest.prefix_blocks`); empty for Azure traces.
        tenant: the tenant the simulator charges the request to (:mod:`gateway.sim.tenants`); empty in the bundled
            traces.
        priority: the request's priority class, an index into ``tenants.classes`` (0 in the bundled traces).
    """

    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()
    tenant: str = ""
    priority: int = 0


def resolve_trace(name_or_path: str | Path) -> Path:
    """Return the file of a bundled trace name (see :data:`BUNDLED_TRACES`) or of an existing path.

    Raises:
        FileNotFoundError: ``name_or_path`` is neither a bundled name nor an existing file; the message lists
            the bundled names.
    """
    key = str(name_or_path)
    if key in BUNDLED_TRACES:
        folder, filename = BUNDLED_TRACES[key]
        resource = resources.files("gateway").joinpath("data", "traces", folder, filename)
        return resource if isinstance(resource, Path) else Path(str(resource))
    path = Path(name_or_path)
    if path.is_file():
        return path
    names = ", ".join(sorted(BUNDLED_TRACES))
    raise FileNotFoundError(f"trace {key!r} is neither a bundled trace ({names}) nor an existing file")


def load_trace(path: str | Path) -> list[TraceRequest]:
    """Load an Azure 2023 CSV or Mooncake JSONL trace, sorted by arrival, the first arrival at 0 s.

    The format is chosen by extension (``.csv``; ``.jsonl``/``.json``), else by the first non-blank line
    (``{`` means JSONL). Zero token counts are clamped to 1 (an engine cannot serve an empty prompt or
    generate nothing). Blank lines are skipped.

    Raises:
        ValueError: a malformed row or header; the message is ``"<file>:<line>: <reason>"``.
        OSError: the file cannot be read.
    """
    path = Path(path)
    with path.open(encoding="utf-8", newline="") as f:
        text = f.read()
    if _is_jsonl(path, text):
        rows, units_per_s = list(_parse_mooncake(path, text.splitlines())), 1e3
    else:
        rows, units_per_s = list(_parse_azure(path, text.splitlines())), 1e9
    rows.sort(key=lambda r: r[0])  # stable: equal arrivals keep file order
    if not rows:
        return []
    # Re-base in the file's own unit first (exact for integer stamps), then convert to seconds.
    t0 = rows[0][0]
    return [TraceRequest((stamp - t0) / units_per_s, prompt, out, ids) for stamp, prompt, out, ids in rows]


def rescale(trace: Iterable[TraceRequest], rate_scale: float) -> list[TraceRequest]:
    """Divide every arrival time by ``rate_scale``: 2.0 replays twice as fast (double the request rate).

    Raises:
        ValueError: ``rate_scale`` is not a finite number > 0.
    """
    if not (math.isfinite(rate_scale) and rate_scale > 0):
        raise ValueError(f"rate_scale must be a finite number > 0, got {rate_scale}")
    return [replace(r, arrival_s=r.arrival_s / rate_scale) for r in trace]


def window(trace: Iterable[TraceRequest], start_s: float, duration_s: float | None = None) -> list[TraceRequest]:
    """Select the requests arriving in ``[start_s, start_s + duration_s)`` (to the end when ``duration_s``
    is None) and re-base them so the window starts at 0 s: arrival ``a`` becomes ``a - start_s``, so idle
    time at the start of the window is kept.

    Raises:
        ValueError: ``start_s < 0`` or ``duration_s <= 0``.
    """
    if not start_s >= 0:
        raise ValueError(f"start_s must be >= 0, got {start_s}")
    if duration_s is not None and not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    end_s = math.inf if duration_s is None else start_s + duration_s
    return [replace(r, arrival_s=r.arrival_s - start_s) for r in trace if start_s <= r.arrival_s < end_s]


def _is_jsonl(path: Path, text: str) -> bool:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return False
    if suffix in (".jsonl", ".json"):
        return True
    first = next((line for line in text.splitlines() if line.strip()), "")
    return first.lstrip().startswith("{")


def _tokens(value: Any, what: str) -> int:
    """A token count: a non-negative integer (``"12"`` or ``12``; ``12.0`` from JSON), clamped to >= 1."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"{what} must be an integer, got {value!r}") from None
    if not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return max(value, 1)


def _hash_ids(value: Any) -> tuple[int, ...]:
    """Mooncake's ``hash_ids``: a list of integer block ids."""
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"hash_ids must be a list of integers, got {value!r}")
    return tuple(value)


def _azure_ns(stamp: str) -> int:
    """Integer nanoseconds since the epoch (as naive UTC) of ``YYYY-MM-DD HH:MM:SS[.f…]``, up to 9
    fraction digits. Integers keep the 100 ns digits exact; a float of epoch seconds would round them
    (ulp ≈ 240 ns)."""
    whole, _, frac = stamp.strip().partition(".")
    if frac and not (frac.isdigit() and len(frac) <= 9):
        raise ValueError(f"bad fractional seconds in TIMESTAMP {stamp!r}")
    try:
        dt = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S")
    except ValueError:
        raise ValueError(f"TIMESTAMP {stamp!r} is not 'YYYY-MM-DD HH:MM:SS.fffffff'") from None
    whole_s = (dt - datetime(1970, 1, 1)) // timedelta(seconds=1)
    return whole_s * 10**9 + int(frac.ljust(9, "0") or 0)


_Row = tuple[int | float, int, int, tuple[int, ...]]
"""(arrival in the file's unit, prompt tokens, output tokens, block ids)."""


def _parse_azure(path: Path, lines: list[str]) -> Iterator[_Row]:
    """Yield rows with arrival in integer ns since the epoch (re-based by the caller)."""
    rows = csv.reader(lines)
    header: list[str] | None = None
    idx: list[int] = []
    for lineno, row in enumerate(rows, start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        if header is None:
            header = [cell.strip() for cell in row]
            missing = [c for c in _AZURE_COLUMNS if c not in header]
            if missing:
                raise ValueError(f"{path}:{lineno}: Azure trace header lacks column(s) {', '.join(missing)}")
            idx = [header.index(c) for c in _AZURE_COLUMNS]
            continue
        try:
            if len(row) != len(header):
                raise ValueError(f"expected {len(header)} fields, got {len(row)}")
            yield (
                _azure_ns(row[idx[0]]),
                _tokens(row[idx[1]], "ContextTokens"),
                _tokens(row[idx[2]], "GeneratedTokens"),
                (),
            )
        except ValueError as exc:
            raise ValueError(f"{path}:{lineno}: {exc}") from exc
    if header is None:
        raise ValueError(f"{path}:1: empty trace file (no header)")


def _parse_mooncake(path: Path, lines: list[str]) -> Iterator[_Row]:
    """Yield rows with arrival in ms from the trace start."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("line is not a JSON object")
            missing = [k for k in _MOONCAKE_KEYS if k not in obj]
            if missing:
                raise ValueError(f"missing key(s) {', '.join(missing)}")
            stamp = obj["timestamp"]
            if isinstance(stamp, bool) or not isinstance(stamp, int | float) or not math.isfinite(stamp):
                raise ValueError(f"timestamp must be a number of ms, got {stamp!r}")
            yield (
                stamp,
                _tokens(obj["input_length"], "input_length"),
                _tokens(obj["output_length"], "output_length"),
                _hash_ids(obj.get("hash_ids", [])),
            )
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"{path}:{lineno}: {exc}") from exc
