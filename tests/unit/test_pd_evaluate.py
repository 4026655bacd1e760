"""``bench/pd_evaluate.py``'s core (the P/D evaluation of issue 15) on a tiny trace slice."""

from __future__ import annotations

import importlib.util
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).parents[2] / "bench"


@pytest.fixture(scope="module")
def pd_evaluate() -> Any:
    for name in ("evaluate", "pd_evaluate"):
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


def test_contenders_cover_every_pair_of_peer_policies_and_sbs_parts(pd_evaluate):
    sglang, vllm = pd_evaluate.contenders("sglang"), pd_evaluate.contenders("vllm")
    assert "sbs" in sglang and "follow_bootstrap_room/least_load" in sglang
    assert not any(c.startswith("follow_bootstrap_room") for c in vllm)
    peers = [c for c in vllm if pd_evaluate.is_peer(c)]
    assert len(peers) == len(pd_evaluate.PREFILL) * len(pd_evaluate.DECODE)
    assert "phase_aware/sbs" in vllm and not pd_evaluate.is_peer("phase_aware/sbs")
    assert not pd_evaluate.is_peer("cache_aware/sbs") and not pd_evaluate.is_peer("sbs")
    assert len(set(sglang)) == len(sglang)


def test_one_case_runs_every_stage_and_keeps_the_loads_within_the_best_peers_rate(pd_evaluate):
    plan = pd_evaluate.Plan(
        presets=("realistic-vllm",),
        traces=("azure-code",),
        steady_minutes=0.75,
        prefill_dp_size=2,
        decode_dp_size=4,
        bisection_steps=1,
    )
    with ThreadPoolExecutor(1) as pool:
        case = pd_evaluate.evaluate_case(plan, "realistic-vllm", "azure-code", pool)
    peer = case["best_peer"]
    assert pd_evaluate.is_peer(peer)
    assert set(case["stage1"]["rows"]) == set(pd_evaluate.contenders("vllm"))
    reference = case["max_sustainable"][peer]["scale"]
    for load, steady in case["steady"].items():
        assert steady["scale"] == pytest.approx(float(load) * reference)
        assert {"sbs", peer} <= set(steady["rows"])
        assert all(r["completed"] == case["requests"] for r in steady["rows"].values())
    lines = pd_evaluate.markdown({"plan": vars(plan), "cases": {"realistic-vllm": {"azure-code": case}}}, "cmd")
    assert any(line.startswith("| realistic-vllm | azure-code | " + peer) for line in lines)
