"""Trace loading and slicing: the bundled public traces, the two formats, and rescale/window arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.workload.traces import (
    BUNDLED_TRACES,
    TraceRequest,
    load_trace,
    rescale,
    resolve_trace,
    window,
)

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def arrivals(trace: list[TraceRequest]) -> list[float]:
    return [r.arrival_s for r in trace]


@pytest.mark.parametrize(
    ("name", "requests", "last_arrival_s"),
    [
        # Data rows (the CSVs have a header, no trailing newline), as in the publishers' READMEs.
        ("azure-conv", 19_366, 3501.721937),
        ("azure-code", 8_819, 3435.948056),
        ("mooncake-conv", 12_031, 3536.999),
    ],
)
def test_bundled_trace_loads(name: str, requests: int, last_arrival_s: float) -> None:
    trace = load_trace(resolve_trace(name))
    assert len(trace) == requests
    assert trace[0].arrival_s == 0.0
    times = arrivals(trace)
    assert times == sorted(times)
    assert trace[-1].arrival_s == pytest.approx(last_arrival_s, abs=1e-9)
    assert all(r.prompt_tokens >= 1 and r.output_tokens >= 1 for r in trace)


def test_bundled_traces_ship_with_their_licenses() -> None:
    for name in BUNDLED_TRACES:
        folder = resolve_trace(name).parent
        assert any(p.name.upper().startswith("LICENSE") for p in folder.iterdir()), folder
    assert (resolve_trace("azure-conv").parent.parent / "README.md").is_file()


def test_azure_conv_first_rows() -> None:
    # 2023-11-16 18:15:46.6805900,374,44 then 18:15:50.9951690,396,109: 4.3145790 s apart.
    first, second = load_trace(resolve_trace("azure-conv"))[:2]
    assert first == TraceRequest(0.0, 374, 44)
    assert (second.prompt_tokens, second.output_tokens) == (396, 109)
    assert second.arrival_s == pytest.approx(4.314579, abs=1e-9)


def test_mooncake_first_rows_share_timestamp() -> None:
    trace = load_trace(resolve_trace("mooncake-conv"))
    assert trace[:3] == [
        TraceRequest(0.0, 6758, 500, tuple(range(14))),
        TraceRequest(0.0, 7322, 490, (0, *range(14, 28))),
        TraceRequest(0.0, 7236, 794, (0, *range(28, 42))),
    ]
    assert all(len(r.hash_ids) == -(-r.prompt_tokens // 512) for r in trace), "one id per 512-token block"


def test_azure_seven_fraction_digits_are_exact(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "t.csv",
        AZURE_HEADER
        + "2023-11-16 23:59:59.9999999,10,1\n"
        + "2023-11-17 00:00:00.0000001,10,1\n"  # crosses midnight: 200 ns later
        + "2023-11-17 00:00:04.3145790,10,1\n"
        + "2023-11-17 00:00:05,10,1",  # no fraction at all, no trailing newline
    )
    assert arrivals(load_trace(path)) == pytest.approx([0.0, 2e-7, 4.3145791, 5.0000001], abs=1e-12)


def test_mooncake_ms_and_sorting(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "t.jsonl",
        '{"timestamp": 5000, "input_length": 3, "output_length": 4, "hash_ids": [1]}\n'
        "\n"
        '{"timestamp": 2000, "input_length": 1, "output_length": 2}\n'
        '{"timestamp": 2500.5, "input_length": 7, "output_length": 8}\n',
    )
    assert load_trace(path) == [
        TraceRequest(0.0, 1, 2),
        TraceRequest(0.5005, 7, 8),
        TraceRequest(3.0, 3, 4, (1,)),
    ]


def test_hash_ids_survive_rescale_and_window_and_azure_has_none(tmp_path: Path) -> None:
    path = write(
        tmp_path, "t.jsonl", '{"timestamp": 1000, "input_length": 3, "output_length": 4, "hash_ids": [7, 9]}\n'
    )
    assert window(rescale(load_trace(path), 2.0), 0.0) == [TraceRequest(0.0, 3, 4, (7, 9))]
    assert all(r.hash_ids == () for r in load_trace(resolve_trace("azure-conv"))[:100])
    bad = write(tmp_path, "bad.jsonl", '{"timestamp": 0, "input_length": 3, "output_length": 4, "hash_ids": "x"}\n')
    with pytest.raises(ValueError, match="hash_ids"):
        load_trace(bad)


def test_zero_tokens_clamped_to_one(tmp_path: Path) -> None:
    csv_path = write(tmp_path, "z.csv", AZURE_HEADER + "2023-11-16 18:00:00.0000000,0,0\n")
    jsonl_path = write(tmp_path, "z.jsonl", '{"timestamp": 0, "input_length": 0, "output_length": 0}\n')
    assert load_trace(csv_path) == [TraceRequest(0.0, 1, 1)]
    assert load_trace(jsonl_path) == [TraceRequest(0.0, 1, 1)]


def test_format_detected_from_content(tmp_path: Path) -> None:
    jsonl = write(tmp_path, "trace.txt", '{"timestamp": 0, "input_length": 5, "output_length": 6}\n')
    azure = write(tmp_path, "trace.log", AZURE_HEADER + "2023-11-16 18:00:00.5,5,6\n")
    assert load_trace(jsonl) == [TraceRequest(0.0, 5, 6)]
    assert load_trace(azure) == [TraceRequest(0.0, 5, 6)]


def test_empty_jsonl_is_an_empty_trace(tmp_path: Path) -> None:
    assert load_trace(write(tmp_path, "e.jsonl", "\n")) == []


@pytest.mark.parametrize(
    ("name", "text", "line", "reason"),
    [
        (
            "a.csv",
            AZURE_HEADER + "2023-11-16 18:00:00.1,1,1\n2023-11-16 18:00:01.1,x,1\n",
            3,
            "ContextTokens",
        ),
        ("a.csv", AZURE_HEADER + "2023-11-16 18:00:00.1,1\n", 2, "expected 3 fields"),
        ("a.csv", AZURE_HEADER + "2023-11-16 18:00:00.1,1,-2\n", 2, "GeneratedTokens must be >= 0"),
        ("a.csv", AZURE_HEADER + "16/11/2023 18:00:00,1,1\n", 2, "TIMESTAMP"),
        ("a.csv", AZURE_HEADER + "2023-11-16 18:00:00.12a,1,1\n", 2, "fractional"),
        ("a.csv", "time,in,out\n2023-11-16 18:00:00.1,1,1\n", 1, "lacks column"),
        ("a.csv", "", 1, "empty trace file"),
        (
            "m.jsonl",
            '{"timestamp": 0, "input_length": 1, "output_length": 1}\n{"timestamp": 1\n',
            2,
            "Expecting",
        ),
        ("m.jsonl", '{"timestamp": 0, "input_length": 1}\n', 1, "missing key(s) output_length"),
        ("m.jsonl", '{"timestamp": "0", "input_length": 1, "output_length": 1}\n', 1, "timestamp"),
        ("m.jsonl", '{"timestamp": 0, "input_length": 1.5, "output_length": 1}\n', 1, "input_length"),
        ("m.jsonl", '{"timestamp": 0, "input_length": true, "output_length": 1}\n', 1, "input_length"),
        ("m.jsonl", "[1, 2]\n", 1, "not a JSON object"),
    ],
)
def test_malformed_row_error_names_file_and_line(tmp_path: Path, name: str, text: str, line: int, reason: str) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(ValueError) as info:
        load_trace(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert reason in message


def test_resolve_trace_names_and_paths(tmp_path: Path) -> None:
    for name, (_, filename) in BUNDLED_TRACES.items():
        path = resolve_trace(name)
        assert path.is_file() and path.name == filename
    own = write(tmp_path, "own.jsonl", "")
    assert resolve_trace(own) == own
    assert resolve_trace(str(own)) == own
    with pytest.raises(FileNotFoundError, match="azure-code, azure-conv, mooncake-conv"):
        resolve_trace("no-such-trace")


TRACE = [TraceRequest(0.0, 1, 1), TraceRequest(1.0, 2, 2), TraceRequest(2.5, 3, 3), TraceRequest(4.0, 4, 4)]


@pytest.mark.parametrize(
    ("rate_scale", "expected"),
    [(1.0, [0.0, 1.0, 2.5, 4.0]), (2.0, [0.0, 0.5, 1.25, 2.0]), (0.5, [0.0, 2.0, 5.0, 8.0])],
)
def test_rescale(rate_scale: float, expected: list[float]) -> None:
    out = rescale(TRACE, rate_scale)
    assert arrivals(out) == expected
    assert [r.prompt_tokens for r in out] == [1, 2, 3, 4]


@pytest.mark.parametrize("rate_scale", [0.0, -1.0, float("inf"), float("nan")])
def test_rescale_rejects_nonpositive(rate_scale: float) -> None:
    with pytest.raises(ValueError, match="rate_scale"):
        rescale(TRACE, rate_scale)


@pytest.mark.parametrize(
    ("start_s", "duration_s", "expected"),
    [
        (0.0, None, [(0.0, 1), (1.0, 2), (2.5, 3), (4.0, 4)]),
        (0.0, 2.5, [(0.0, 1), (1.0, 2)]),  # half-open: 2.5 excluded
        (0.5, 2.5, [(0.5, 2), (2.0, 3)]),  # re-based to the window start, idle lead kept
        (1.0, None, [(0.0, 2), (1.5, 3), (3.0, 4)]),
        (4.5, 10.0, []),
    ],
)
def test_window(start_s: float, duration_s: float | None, expected: list[tuple[float, int]]) -> None:
    out = window(TRACE, start_s, duration_s)
    assert [(r.arrival_s, r.prompt_tokens) for r in out] == expected


@pytest.mark.parametrize(("start_s", "duration_s"), [(-1.0, None), (0.0, 0.0), (0.0, -2.0)])
def test_window_rejects_bad_bounds(start_s: float, duration_s: float | None) -> None:
    with pytest.raises(ValueError, match=r"start_s|duration_s"):
        window(TRACE, start_s, duration_s)
