"""``bench/evaluate.py``'s core (the evaluation of issue 13) on a tiny trace slice."""

from __future__ import annotations

import importlib.util
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from gateway.workload.traces import TraceRequest, load_trace, resolve_trace, window

BENCH = Path(__file__).parents[2] / "bench"


@pytest.fixture(scope="module")
def evaluate_module() -> Any:
    spec = importlib.util.spec_from_file_location("evaluate", BENCH / "evaluate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["evaluate"] = module
    spec.loader.exec_module(module)
    return module


def tiny(name: str) -> list[TraceRequest]:
    return window(load_trace(resolve_trace(name)), 0.0, 40.0)


def strip_wall(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip_wall(v) for k, v in value.items() if k != "wall_s"}
    if isinstance(value, list):
        return [strip_wall(v) for v in value]
    return value


def test_evaluation_core_on_a_tiny_slice(evaluate_module):
    ev = evaluate_module
    plan = ev.Plan(
        presets=("realistic-sglang", "idealised"),
        traces=("azure-conv",),
        policies=("sbs", "least_tokens"),
        rate_policies=("least_tokens",),
        steady_minutes=0.5,
        transient_minutes=0.1,
        transient_slices=5,
        instances=1,
        dp_size=2,
        bisection_steps=1,
    )
    with ThreadPoolExecutor(1) as pool:
        report = ev.evaluate(plan, pool, load=tiny)
        again = ev.evaluate(plan, pool, load=tiny)
        earlier = json.loads(json.dumps(report))
        resumed = ev.evaluate(plan, pool, load=tiny, reuse=[earlier])
        halves = [json.loads(json.dumps(report)) for _ in range(2)]
        del halves[0]["cases"]["idealised"], halves[1]["cases"]["realistic-sglang"]
        merged = ev.evaluate(plan, pool, load=tiny, reuse=halves)  # two reports, one preset each, make one
        earlier["presets"]["idealised"]["engine"]["alltoall_s"] = 1.0  # a preset whose settings changed is rerun
        partly = ev.evaluate(plan, pool, load=tiny, reuse=[earlier])
    assert strip_wall(report) == strip_wall(again)
    assert resumed["cases"] == earlier["cases"] and len(resumed["reused"]) == 4
    assert merged["cases"] == json.loads(json.dumps(report["cases"])) and len(merged["reused"]) == 4
    assert partly["reused"] == ["realistic-sglang azure-conv unified", "realistic-sglang azure-conv prefill-only"]
    json.dumps(report)
    assert set(report["presets"]) == {"realistic-sglang", "idealised"}
    assert report["presets"]["realistic-sglang"]["nonstream_share"] == 0.3
    for mode in ("unified", "prefill-only"):
        case = report["cases"]["realistic-sglang"]["azure-conv"][mode]
        assert set(case["slos"]) == {
            "derived",
            "2s/50ms",
            "2s/100ms",
            "derived TTFT/50ms",
            "derived TTFT/100ms",
        }
        probes = case["max_sustainable"]["least_tokens"]["probes"]
        assert 1 <= len(probes) <= plan.bisection_steps + 1
        assert set(case["steady"]) == {"0.5", "0.7", "0.9"}
        assert len(case["transient"]["slices"]) == 5
        for piece in case["transient"]["slices"]:
            assert set(piece["rows"]) == {"sbs", "least_tokens"}
        for entry in case["steady"].values():
            for row in entry["rows"].values():
                assert len(row["fifths"]) == 5 and set(row["goodput"]) == set(case["slos"])
                assert {"growth", "allowed", "steady"} <= set(row["steadiness"])
                if mode == "prefill-only":
                    assert row["tpot_s"]["mean"] is None
    md = "\n".join(ev.markdown(report, "python bench/evaluate.py --test"))
    assert "## Preset `realistic-sglang` (headline)" in md and "## Preset `idealised` (labelled column)" in md
    assert "### azure-conv, prefill-only" in md and "goodput 2s/50ms" in md
    assert ev.runs_in(report)[0] > 0


def test_an_aligned_preset_runs_the_plain_presets_traffic(evaluate_module):
    ev = evaluate_module
    plan = ev.Plan(
        presets=("realistic-sglang", "realistic-sglang-aligned"),
        traces=("azure-conv",),
        modes=("unified",),
        policies=("sbs", "least_tokens"),
        rate_policies=("least_tokens",),
        steady_minutes=0.5,
        transient_minutes=0.1,
        transient_slices=1,
        instances=1,
        dp_size=2,
        bisection_steps=1,
    )
    with ThreadPoolExecutor(1) as pool:
        report = ev.evaluate(plan, pool, load=tiny)
    plain = report["cases"]["realistic-sglang"]["azure-conv"]["unified"]
    aligned = report["cases"]["realistic-sglang-aligned"]["azure-conv"]["unified"]
    assert aligned["reference"] == plain["reference"] | {"preset": "realistic-sglang"}
    assert [e["scale"] for e in aligned["steady"].values()] == [e["scale"] for e in plain["steady"].values()]
    assert "least_tokens" in aligned["max_sustainable"]
    md = "\n".join(ev.markdown(report, "test"))
    assert "the engine's own alignment off" in md and "against `realistic-sglang-aligned`, the same traffic" in md
