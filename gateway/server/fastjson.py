"""JSON on the relay's hot path: ``orjson`` (Rust), with the standard library where orjson refuses what JSON allows.

orjson parses and writes several times faster than :mod:`json` (``bench/results/dataplane.md``). What it refuses
to parse is parsed again by :mod:`json`, so what is accepted and the error raised do not change (the gateway's
validation refuses ``NaN`` itself); what it cannot write (object keys that are not strings, integers beyond 64
bits) is written by :mod:`json`. Two differences remain: an integer beyond 64 bits, which no OpenAI field takes,
parses as a float, and what the gateway writes has no whitespace.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads(raw: bytes | str) -> Any:
    """Parse ``raw`` as :func:`json.loads` does (the same errors: :class:`ValueError`, also for invalid UTF-8,
    and :class:`RecursionError`), orjson first."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def dumps(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON (non-ASCII characters as they are), orjson first.

    Raises:
        TypeError: a value JSON cannot represent.
    """
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
