"""The seam between the gateway and one kind of engine.

An :class:`EngineAdapter` knows, for its engine flavour, how to pin a request to a DP rank, where the per-rank
load metrics are and what they are called, and how its error answers look. Adding an engine is adding one
module with one subclass.

Metrics parsing is pure (exposition text in, per-rank figures out), with ``prometheus_client``'s parser; labels
are read by name, never by position (multiprocess-mode servers sort them), series the adapter does not know are
ignored, and ``*_created`` series may or may not be present.

Engines are not trusted: a body that is not exposition text, or whose last line is cut (the text format ends
every line, the last included, with ``\n``), raises :class:`MetricsParseError`; a gauge sample that is not a
finite number >= 0 (``NaN``, ``+Inf``, negative) and a rank label that is not an integer >= 0 are skipped, so
the allocator never sees them. A body cut exactly at a line end cannot be told from a whole one in this
format; the HTTP layer catches a body shorter than its ``Content-Length`` or chunked framing.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, MutableMapping
from typing import Any, ClassVar

from prometheus_client.parser import text_string_to_metric_families

from gateway.errors import normalize_engine_error
from gateway.types import RankMetrics


class MetricsParseError(ValueError):
    """The exposition text could not be parsed."""


_SELECTOR = re.compile(r'(?P<name>[^{]+)\{(?P<label>\w+)="(?P<value>[^"]*)"\}')
"""``name{label="value"}``: one series of a sample, in :func:`read_rank_gauges`'s ``fields``."""


def read_rank_gauges(text: str, fields: Mapping[str, str], rank_label: str | None) -> dict[int, dict[str, float]]:
    """Collect gauges per DP rank from Prometheus exposition text.

    Args:
        text: the ``/metrics`` body.
        fields: sample name → field name (several names may map to one field; the first listed wins
            when both are present). A name may select one label value, ``name{label="value"}``: then only that
            series of the sample is read (vLLM's ``vllm:num_requests_kv_fetch_by_stage{stage="in_progress"}``).
        rank_label: label carrying the DP rank; series without it count as rank 0.

    Returns:
        ``{rank: {field: value}}``. When several series give the same field for a rank (SGLang: one per
        ``tp_rank``), the largest value is kept. Samples whose value is not finite and >= 0, or whose rank
        label is not an integer >= 0, are skipped.

    Raises:
        MetricsParseError: the text is not valid exposition format, or its last line is cut (no final ``\n``).
    """
    if text and not text.endswith("\n"):
        raise MetricsParseError("invalid exposition text: truncated (the last line does not end with a newline)")
    priority = {key: i for i, key in enumerate(fields)}
    selected: dict[str, list[tuple[str, str, str]]] = {}
    for key in fields:
        if match := _SELECTOR.fullmatch(key):
            selected.setdefault(match["name"], []).append((match["label"], match["value"], key))
    found: dict[int, dict[str, tuple[int, float]]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = sample.name
                if key not in fields:
                    choices = selected.get(sample.name, ())
                    key = next((k for label, value, k in choices if sample.labels.get(label) == value), "")
                field = fields.get(key)
                if field is None:
                    continue
                raw_rank = sample.labels.get(rank_label, "0") if rank_label else "0"
                try:
                    rank = int(raw_rank)
                except ValueError:
                    continue
                if rank < 0 or not (math.isfinite(sample.value) and sample.value >= 0):
                    continue
                rank_fields = found.setdefault(rank, {})
                prio = priority[key]
                old = rank_fields.get(field)
                if old is None or prio < old[0] or (prio == old[0] and sample.value > old[1]):
                    rank_fields[field] = (prio, float(sample.value))
    except Exception as exc:  # the third-party parser may fail on junk in any way: all of it is a parse error
        raise MetricsParseError(f"invalid exposition text: {exc}") from exc
    return {rank: {f: v for f, (_, v) in fs.items()} for rank, fs in found.items()}


def to_rank_metrics(gauges: dict[int, dict[str, float]]) -> dict[int, RankMetrics]:
    """Build :class:`RankMetrics` from :func:`read_rank_gauges` output (fields named as its attributes)."""
    return {rank: RankMetrics(**fields) for rank, fields in gauges.items()}


class EngineAdapter(ABC):
    """How the gateway speaks to one engine flavour."""

    flavor: ClassVar[str]
    metrics_path: ClassVar[str] = "/metrics"
    health_path: ClassVar[str] = "/health"
    server_info_path: ClassVar[str | None] = None
    """Where the engine reports its own settings (read for ``engines[].prefill_alignment: auto``); ``None``: it
    reports none the gateway reads."""

    def prefill_alignment_from_server_info(self, text: str) -> bool | None:
        """Whether the engine aligns prefill across its DP ranks, from its :attr:`server_info_path` body, or
        ``None`` when the body does not say (the engine is then treated as not aligning)."""
        return None

    @abstractmethod
    def pin_rank(self, body: dict[str, Any], headers: MutableMapping[str, str], rank: int) -> None:
        """Pin the request to DP ``rank`` by editing its JSON ``body`` or upstream ``headers`` in place.

        Any rank choice the client put in the body is overwritten: the gateway decides placement.
        """

    @abstractmethod
    def parse_metrics(self, text: str) -> dict[int, RankMetrics]:
        """Per-rank load from the engine's ``/metrics`` text.

        Raises:
            MetricsParseError: the text is not valid exposition format.
        """

    def normalize_error(self, status: int, raw: bytes) -> dict[str, Any]:
        """The engine's error answer (HTTP ``status``, body ``raw``) as an OpenAI-style error body.

        The shapes every engine may send are read by :func:`gateway.errors.normalize_engine_error`; an adapter
        whose engine has a shape of its own reads that first.
        """
        return normalize_engine_error(status, raw)
