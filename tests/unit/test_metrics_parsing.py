"""Engine ``/metrics`` parsing and DP-rank pinning, driven by fixture files for each engine flavour and version.

The fixtures live in ``tests/unit/fixtures/metrics/`` (see its README: three real vLLM 0.32 captures, the rest written
by hand). Every table compares the whole ``{rank: RankMetrics}`` dict, so a failure shows every rank at once.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from gateway.engines import EngineAdapter, MetricsParseError
from gateway.engines.base import read_rank_gauges
from gateway.engines.sglang import SglangAdapter
from gateway.engines.vllm import VllmAdapter
from gateway.types import RankMetrics

FIXTURES = Path(__file__).parent / "fixtures" / "metrics"

REAL_DP2_IDLE = "vllm-0.32-cpu_dp2_idle.prom"
REAL_RUNNING16 = "vllm-0.32-cpu_running16.prom"
REAL_RUNNING4_WAITING6 = "vllm-0.32-cpu_running4_waiting6.prom"
VLLM_DP4_DECLARED = "vllm-0.32_dp4_declared-labels.prom"
VLLM_DP4_MULTIPROCESS = "vllm-0.32_dp4_multiprocess.prom"
VLLM_OLD_KV_NAME = "vllm-0.9_dp2_gpu-cache-usage.prom"
VLLM_BOTH_KV_NAMES = "vllm-0.11_dp2_both-kv-names.prom"
SGLANG_DP4 = "sglang-0.5_dp4_dp-attention.prom"
SGLANG_TP_DUPLICATES = "sglang-0.5_dp2_tp-duplicates.prom"
SGLANG_NO_DP = "sglang-0.5_no-dp.prom"

REAL_CAPTURES = (REAL_DP2_IDLE, REAL_RUNNING16, REAL_RUNNING4_WAITING6)


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


def vllm(running: float, waiting: float, kv_usage: float) -> RankMetrics:
    """What vLLM reports for one rank: no token counts."""
    return RankMetrics(running=running, waiting=waiting, kv_usage=kv_usage)


SGLANG_CAPACITY = 131072.0


def sglang(running: float, waiting: float, used_tokens: float) -> RankMetrics:
    """What SGLang reports for one rank of the hand-written fixtures (KV pool of 131072 tokens)."""
    return RankMetrics(
        running=running,
        waiting=waiting,
        kv_usage=used_tokens / SGLANG_CAPACITY,
        kv_used_tokens=used_tokens,
        kv_capacity_tokens=SGLANG_CAPACITY,
    )


VLLM_DP4 = {0: vllm(3, 0, 0.25), 1: vllm(0, 2, 0.0), 2: vllm(7, 5, 0.8125), 3: vllm(1, 0, 0.0625)}

FIXTURE_CASES = [
    # Real captures: the figures are the ones in the files' own sample lines.
    pytest.param(VllmAdapter, REAL_DP2_IDLE, {0: vllm(0, 0, 0.0), 1: vllm(0, 0, 0.0)}, id="vllm-real-dp2-idle"),
    pytest.param(VllmAdapter, REAL_RUNNING16, {0: vllm(16, 0, 0.044016506189821225)}, id="vllm-real-running16"),
    pytest.param(
        VllmAdapter, REAL_RUNNING4_WAITING6, {0: vllm(4, 6, 0.011019283746556474)}, id="vllm-real-running4-waiting6"
    ),
    # Label order and *_created series make no difference: both layouts give the same ranks.
    pytest.param(VllmAdapter, VLLM_DP4_DECLARED, VLLM_DP4, id="vllm-dp4-declared-labels-with-created"),
    pytest.param(VllmAdapter, VLLM_DP4_MULTIPROCESS, VLLM_DP4, id="vllm-dp4-multiprocess"),
    pytest.param(VllmAdapter, VLLM_OLD_KV_NAME, {0: vllm(2, 1, 0.5), 1: vllm(5, 0, 0.375)}, id="vllm-old-kv-name"),
    # gpu_cache_usage_perc says 0.75 / 0.125: kv_cache_usage_perc must win whether it is larger or smaller.
    pytest.param(VllmAdapter, VLLM_BOTH_KV_NAMES, {0: vllm(1, 0, 0.5), 1: vllm(2, 3, 0.25)}, id="vllm-both-kv-names"),
    pytest.param(
        SglangAdapter,
        SGLANG_DP4,
        {0: sglang(10, 0, 16384), 1: sglang(12, 1, 32768), 2: sglang(0, 0, 0), 3: sglang(31, 4, 114688)},
        id="sglang-dp4",
    ),
    # dp_rank 1: running 9 and 8, queue 2 and 3 from its two schedulers; the larger of each is kept.
    pytest.param(
        SglangAdapter, SGLANG_TP_DUPLICATES, {0: sglang(6, 0, 65536), 1: sglang(9, 3, 98304)}, id="sglang-tp-duplicates"
    ),
    pytest.param(SglangAdapter, SGLANG_NO_DP, {0: sglang(5, 2, 40960)}, id="sglang-no-dp"),
]


@pytest.mark.parametrize(("adapter_cls", "name", "expected"), FIXTURE_CASES)
def test_fixture_parses_to_expected_ranks(
    adapter_cls: type[EngineAdapter], name: str, expected: dict[int, RankMetrics]
) -> None:
    assert adapter_cls().parse_metrics(fixture(name)) == expected


@pytest.mark.parametrize("name", REAL_CAPTURES)
def test_real_capture_agrees_with_its_own_sample_lines(name: str) -> None:
    """An independent reading of the capture (a regex over its lines) gives the same figures as the parser."""
    text = fixture(name)
    line = re.compile(r"^vllm:(num_requests_running|num_requests_waiting|kv_cache_usage_perc)\{([^}]*)\} (\S+)$", re.M)
    fields = {"num_requests_running": "running", "num_requests_waiting": "waiting", "kv_cache_usage_perc": "kv_usage"}
    by_rank: dict[int, dict[str, float]] = {}
    for metric, labels, value in line.findall(text):
        engine = re.search(r'engine="(\d+)"', labels)
        assert engine is not None, f"{name}: {metric} without an engine label"
        by_rank.setdefault(int(engine.group(1)), {})[fields[metric]] = float(value)
    assert by_rank, f"{name} has no load gauges"
    expected = {rank: RankMetrics(**values) for rank, values in by_rank.items()}
    assert VllmAdapter().parse_metrics(text) == expected


def test_real_kv_usage_is_the_files_value() -> None:
    metrics = VllmAdapter().parse_metrics(fixture(REAL_RUNNING4_WAITING6))
    assert metrics[0].kv_usage == pytest.approx(0.011019283746556474)
    assert metrics[0].kv_used_tokens is None
    assert metrics[0].kv_capacity_tokens is None


def reorder_labels(text: str) -> str:
    """Reverse the label order of every sample line (comments untouched)."""

    def reverse(match: re.Match[str]) -> str:
        pairs = re.findall(r'\w+="(?:[^"\\]|\\.)*"', match.group(2))
        return f"{match.group(1)}{{{','.join(reversed(pairs))}}}"

    return re.sub(r"^([^#\s{]+)\{([^}]*)\}", reverse, text, flags=re.M)


@pytest.mark.parametrize(("adapter_cls", "name", "expected"), FIXTURE_CASES)
def test_label_order_does_not_matter(
    adapter_cls: type[EngineAdapter], name: str, expected: dict[int, RankMetrics]
) -> None:
    reordered = reorder_labels(fixture(name))
    assert reordered != fixture(name)
    assert adapter_cls().parse_metrics(reordered) == expected


def test_created_series_make_no_difference() -> None:
    text = fixture(VLLM_DP4_DECLARED)
    without_created = "\n".join(line for line in text.splitlines() if "_created" not in line) + "\n"
    assert "_created" in text
    assert VllmAdapter().parse_metrics(without_created) == VllmAdapter().parse_metrics(text) == VLLM_DP4


UNKNOWN_SERIES = """\
# HELP vllm:num_requests_running_by_priority A gauge from a future version.
# TYPE vllm:num_requests_running_by_priority gauge
vllm:num_requests_running_by_priority{engine="0",model_name="m",priority="0"} 99.0
# TYPE vllm:num_requests_running_created gauge
vllm:num_requests_running_created{engine="0",model_name="m"} 1.7e+09
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{dp_rank="0"} 98.0
# TYPE process_open_fds gauge
process_open_fds 46.0
"""


def test_unknown_series_are_ignored() -> None:
    base = fixture(REAL_RUNNING16)
    assert VllmAdapter().parse_metrics(base + UNKNOWN_SERIES) == {0: vllm(16, 0, 0.044016506189821225)}
    assert VllmAdapter().parse_metrics(UNKNOWN_SERIES) == {}


def test_sglang_ignores_vllm_series_and_vice_versa() -> None:
    assert SglangAdapter().parse_metrics(fixture(REAL_RUNNING16)) == {}
    assert VllmAdapter().parse_metrics(fixture(SGLANG_DP4)) == {}


def test_series_with_a_non_integer_rank_label_are_skipped() -> None:
    text = (
        'vllm:num_requests_running{engine="0",model_name="m"} 2\n'
        'vllm:num_requests_running{engine="api-server",model_name="m"} 7\n'
    )
    assert VllmAdapter().parse_metrics(text) == {0: RankMetrics(running=2)}


def test_missing_fields_default() -> None:
    """A rank that reports only some gauges: counts default to 0, KV figures to None."""
    text = 'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5\n'
    assert VllmAdapter().parse_metrics(text) == {1: RankMetrics(running=0.0, waiting=0.0, kv_usage=0.5)}


@pytest.mark.parametrize(
    ("text", "rank_label", "expected"),
    [
        pytest.param("", "engine", {}, id="empty"),
        pytest.param('a{engine="2"} 1\nb{engine="2"} 5\n', "engine", {2: {"x": 1.0}}, id="first-listed-name-wins"),
        pytest.param('b{engine="2"} 5\na{engine="2"} 1\n', "engine", {2: {"x": 1.0}}, id="first-listed-wins-any-order"),
        pytest.param('b{engine="2"} 5\n', "engine", {2: {"x": 5.0}}, id="fallback-name-alone"),
        pytest.param('a{engine="0",tp="0"} 3\na{engine="0",tp="1"} 4\n', "engine", {0: {"x": 4.0}}, id="largest-kept"),
        pytest.param('a{engine="0",tp="0"} 4\na{engine="0",tp="1"} 3\n', "engine", {0: {"x": 4.0}}, id="largest-first"),
        pytest.param('a{model_name="m"} 3\n', "engine", {0: {"x": 3.0}}, id="no-rank-label-is-rank-0"),
        pytest.param('a{engine="5"} 3\n', None, {0: {"x": 3.0}}, id="rank-label-none-is-rank-0"),
        pytest.param('a{engine="0"} 3\nc{engine="1"} 2\n', "engine", {0: {"x": 3.0}, 1: {"y": 2.0}}, id="per-rank"),
    ],
)
def test_read_rank_gauges(text: str, rank_label: str | None, expected: dict[int, dict[str, float]]) -> None:
    fields = {"a": "x", "b": "x", "c": "y"}
    assert read_rank_gauges(text, fields, rank_label) == expected


def cut_after(name: str, marker: str) -> str:
    """The fixture's text up to and including the first ``marker``, as if the body were cut there."""
    text = fixture(name)
    return text[: text.index(marker) + len(marker)]


# (h) Bodies that are not exposition text. What prometheus_client 0.26's parser does with each, checked by hand:
# it raises ValueError on most junk (wrapped as MetricsParseError), but any line starting with "#" is a comment
# and str.strip() whitespace (including \v, \f, \x1c-\x1e) is a blank line, so such garbage parses to nothing.
NOT_EXPOSITION = [
    pytest.param('vllm:num_requests_running{engine="0" 3\n', id="unclosed-brace"),
    pytest.param('vllm:num_requests_running{engine="0",model_name="m"}\n', id="missing-value"),
    pytest.param('vllm:num_requests_running{engine="0"} three\n', id="non-numeric-value"),
    pytest.param('vllm:num_requests_running{engine="0",engine="1"} 3\n', id="duplicate-label"),
    pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00".decode("latin-1"), id="binary-png"),
    pytest.param("\x00\x01\x02\xff\xfe", id="binary-nul"),
    pytest.param("<html><body><h1>502 Bad Gateway</h1></body></html>\n", id="html-error-page"),
    pytest.param('{"detail": "Not Found"}', id="json"),
    pytest.param("# TYPE\n", id="bare-type-comment"),
    pytest.param("# TYPE vllm:num_requests_running histogramm\n", id="unknown-metric-type"),
    pytest.param(cut_after(REAL_DP2_IDLE, 'vllm:num_requests_running{engine="1",model_na'), id="capture-cut-in-labels"),
]


@pytest.mark.parametrize("adapter_cls", [VllmAdapter, SglangAdapter])
@pytest.mark.parametrize("text", NOT_EXPOSITION)
def test_not_exposition_text_raises(adapter_cls: type[EngineAdapter], text: str) -> None:
    with pytest.raises(MetricsParseError, match="invalid exposition text") as info:
        adapter_cls().parse_metrics(text)
    assert isinstance(info.value, ValueError)
    assert info.value.__cause__ is not None or "truncated" in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("\n\n", id="blank-lines"),
        pytest.param("# only a comment\n", id="comment"),
        pytest.param("#\x05\x91\xff\xfe binary after a hash\n", id="binary-after-hash"),
        pytest.param("\x0b\x0c\x1c\x1d\x1e\n", id="whitespace-control-chars"),
        pytest.param("# HELP vllm:num_requests_running\n", id="help-without-samples"),
    ],
)
def test_junk_that_parses_to_nothing_gives_no_ranks(text: str) -> None:
    assert VllmAdapter().parse_metrics(text) == {}
    assert SglangAdapter().parse_metrics(text) == {}


def test_capture_cut_inside_a_line_is_detected() -> None:
    """The text format ends every line with ``\\n``: a body cut inside a number (``16.0`` read as ``1``) or a
    name is refused rather than read as one running request."""
    text = fixture(REAL_RUNNING16)
    line = 'vllm:num_requests_running{engine="0",model_name="smollm2"} 16.0\n'
    for cut in (text.index(line) + len(line) - len("6.0\n"), text.index(line) + 10, len(text) - 1):
        with pytest.raises(MetricsParseError, match="truncated"):
            VllmAdapter().parse_metrics(text[:cut])


def test_capture_cut_between_lines_is_not_detected() -> None:
    """Known limit: the text format has no end marker, so a body cut exactly at a line end parses (only the HTTP
    layer, Content-Length or chunked framing, can tell it was cut)."""
    text = fixture(REAL_RUNNING16)
    line = 'vllm:num_requests_running{engine="0",model_name="smollm2"} 16.0\n'
    assert VllmAdapter().parse_metrics(text[: text.index(line)]) == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param('a{engine="0"} NaN\nc{engine="0"} 2\n', {0: {"y": 2.0}}, id="nan-skipped"),
        pytest.param('a{engine="0"} +Inf\na{engine="1"} -Inf\n', {}, id="infinities-skipped"),
        pytest.param('a{engine="0"} -3\nc{engine="0"} 0\n', {0: {"y": 0.0}}, id="negative-skipped"),
        pytest.param('a{engine="0",tp="0"} NaN\na{engine="0",tp="1"} 4\n', {0: {"x": 4.0}}, id="nan-not-largest"),
        pytest.param('a{engine="-1"} 3\na{engine="1"} 2\n', {1: {"x": 2.0}}, id="negative-rank-skipped"),
        pytest.param('a{engine="1.5"} 3\na{engine="x"} 3\n', {}, id="non-integer-rank-skipped"),
    ],
)
def test_values_and_ranks_that_make_no_sense_are_skipped(text: str, expected: dict[int, dict[str, float]]) -> None:
    assert read_rank_gauges(text, {"a": "x", "c": "y"}, "engine") == expected


@pytest.mark.parametrize("adapter_cls", [VllmAdapter, SglangAdapter])
def test_nan_and_negative_figures_never_reach_rank_metrics(adapter_cls: type[EngineAdapter]) -> None:
    names = {
        VllmAdapter: ("vllm:num_requests_running", "engine"),
        SglangAdapter: ("sglang:num_running_reqs", "dp_rank"),
    }
    name, label = names[adapter_cls]
    text = f'{name}{{{label}="0"}} NaN\n{name}{{{label}="1"}} -2\n{name}{{{label}="-1"}} 5\n{name}{{{label}="2"}} 3\n'
    assert adapter_cls().parse_metrics(text) == {2: RankMetrics(running=3.0)}


# Pinning.


def test_vllm_pin_rank_sets_the_header_and_leaves_the_body() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "data_parallel_rank": 1}
    before = copy.deepcopy(body)
    headers: dict[str, str] = {"X-Request-Id": "r1"}
    VllmAdapter().pin_rank(body, headers, 3)
    assert headers == {"X-Request-Id": "r1", "X-data-parallel-rank": "3"}
    assert body == before


def test_vllm_pin_rank_overwrites_an_earlier_pin() -> None:
    headers: dict[str, str] = {}
    VllmAdapter().pin_rank({}, headers, 0)
    VllmAdapter().pin_rank({}, headers, 2)
    assert headers == {"X-data-parallel-rank": "2"}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param({"model": "m"}, {"model": "m", "routed_dp_rank": 3}, id="plain"),
        pytest.param(
            {"model": "m", "data_parallel_rank": 0}, {"model": "m", "routed_dp_rank": 3}, id="legacy-field-removed"
        ),
        pytest.param(
            {"model": "m", "routed_dp_rank": 7}, {"model": "m", "routed_dp_rank": 3}, id="client-rank-replaced"
        ),
    ],
)
def test_sglang_pin_rank_sets_the_body_field(body: dict[str, object], expected: dict[str, object]) -> None:
    headers: dict[str, str] = {}
    SglangAdapter().pin_rank(body, headers, 3)
    assert body == expected
    assert headers == {}
