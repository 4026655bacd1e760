"""Simulator presets, the prefill-only transform, steady state and the maximum sustainable rate."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from gateway.sim.calibration import EngineModelConfig
from gateway.sim.information import InformationLimits, measured_estimate_error
from gateway.sim.presets import NONSTREAM_SHARE, PRESET_NAMES, idealised, prefill_only, preset, realistic
from gateway.sim.simulate import SimConfig, SimResult, Slo, _Record, simulate
from gateway.sim.steady_state import backlog_at, max_sustainable_scale, steadiness
from gateway.workload.traces import TraceRequest


def test_idealised_is_the_simulator_default():
    p = preset("idealised", 8)
    assert p.apply(SimConfig()) == SimConfig()
    assert p == idealised()


@pytest.mark.parametrize("flavor", ["sglang", "vllm"])
def test_realistic_is_as_shipped_with_measured_limits(flavor):
    p = preset(f"realistic-{flavor}", 16)
    assert p.engine == EngineModelConfig.as_shipped(flavor, 16)
    assert p.limits.estimate_error == measured_estimate_error("measured")
    assert p.limits.nonstream_share == NONSTREAM_SHARE
    assert p.limits.dispatch_latency_s > 0
    config = p.apply(SimConfig(policy="least_tokens", dp_size=16))
    assert (config.policy, config.engine, config.limits) == ("least_tokens", p.engine, p.limits)


def test_settings_list_everything_and_are_json():
    p = realistic("sglang", 8, engine_flags={"chunked_prefill_size": 16384})
    s = json.loads(json.dumps(p.settings()))
    assert s["engine"]["max_prefill_tokens_per_step"] == 2048
    assert s["engine"]["step_composition"] == "sglang" and "new_token_ratio" in s["engine"]
    assert s["engine_flags"] == {"chunked_prefill_size": 16384}
    assert s["nonstream_share"] == 0.3 and s["estimate_error"]["sigma"] > 0
    assert "chunked_prefill_size=16384" in p.describe()
    assert idealised().settings()["estimate_error"] is None


def test_unknown_preset_and_foreign_flags_are_refused():
    with pytest.raises(ValueError, match="realistic-sglang"):
        preset("realistic", 8)
    with pytest.raises(ValueError, match="vLLM settings"):
        realistic("sglang", 8, engine_flags={"max_num_seqs": 64})
    assert set(PRESET_NAMES) == {
        "idealised",
        "realistic-sglang",
        "realistic-sglang-aligned",
        "realistic-vllm",
        "realistic-vllm-aligned",
    }
    with pytest.raises(ValueError, match="vLLM setting"):
        realistic("sglang", 8, engine_flags={"prefill_schedule_interval": 2})
    with pytest.raises(ValueError, match="SGLang settings"):
        realistic("vllm", 8, engine_flags={"enable_prefill_delayer": True})


@pytest.mark.parametrize(
    ("flavor", "field", "on", "off"),
    [("sglang", "enable_prefill_delayer", True, False), ("vllm", "prefill_schedule_interval", 2, 1)],
)
def test_aligned_preset_is_realistic_with_the_engines_own_alignment_on(flavor, field, on, off):
    plain, aligned = preset(f"realistic-{flavor}", 8), preset(f"realistic-{flavor}-aligned", 8)
    assert getattr(plain.engine, field) == off and getattr(aligned.engine, field) == on
    assert replace(aligned.engine, **{field: off}) == plain.engine
    assert aligned.limits == plain.limits
    assert aligned.name == f"realistic-{flavor}-aligned" and field in aligned.describe()


def test_cli_offers_every_preset():
    from gateway.cli.simulate import simulate

    (option,) = [p for p in simulate.params if p.name == "preset"]
    assert tuple(option.type.choices) == PRESET_NAMES


def test_prefill_only_sets_every_output_to_one_and_nothing_decodes():
    trace = [TraceRequest(0.1 * i, 500 + 100 * i, 50, (i,)) for i in range(20)]
    pd = prefill_only(trace)
    assert [r.output_tokens for r in pd] == [1] * 20
    assert [(r.arrival_s, r.prompt_tokens, r.hash_ids) for r in pd] == [
        (r.arrival_s, r.prompt_tokens, r.hash_ids) for r in trace
    ]
    result = simulate(pd, SimConfig(instances=1, dp_size=2))
    assert all(r.done_s == r.first_token_s for r in result.records)


def _result(first_tokens: list[float | None], arrivals: list[float]) -> SimResult:
    records = [_Record(a, 1, 0.0, a, f, f) for a, f in zip(arrivals, first_tokens, strict=True)]
    return SimResult(records, [], max(f or 0.0 for f in first_tokens))


def test_backlog_counts_arrived_requests_without_a_first_token():
    result = _result([1.0, 5.0, None], [0.0, 1.0, 2.0])
    assert [backlog_at(result, t) for t in (0.5, 1.5, 3.0, 6.0)] == [1, 1, 2, 1]


def test_a_run_that_keeps_up_is_steady_and_one_falling_behind_is_not():
    arrivals = [float(i) for i in range(200)]
    keeping_up = _result([a + 0.5 for a in arrivals], arrivals)
    # served one per 2 s while arriving one per 1 s: the backlog grows linearly
    falling_behind = _result([2.0 * i + 0.5 for i in range(200)], arrivals)
    slo = Slo(ttft_s=2.0)
    ok = steadiness(keeping_up, slo, ranks=4)
    assert ok.steady and ok.sustainable and ok.slo_attainment == 1.0
    bad = steadiness(falling_behind, slo, ranks=4)
    assert not bad.steady and bad.growth == pytest.approx(50, rel=0.1)
    assert not steadiness(keeping_up, Slo(ttft_s=0.1), ranks=4).sustainable


def test_max_sustainable_scale_bisects_within_its_budget():
    calls = []

    def sustainable(scale: float) -> bool:
        calls.append(scale)
        return scale <= 3.3

    found = max_sustainable_scale(sustainable, 1.0, 9.0, steps=6)
    assert 3.3 / 9.0 ** (1 / 2**6) <= found.scale <= 3.3
    assert len(calls) == 7 and [s for s, _ in found.probes] == calls and 9.0 not in calls
    assert max_sustainable_scale(lambda s: False, 1.0, 2.0).scale == 0.0
    always = max_sustainable_scale(lambda s: True, 1.0, 2.0, steps=4)
    assert always.scale == pytest.approx(2.0 / 2.0 ** (1 / 2**4)) and len(always.probes) == 5
    with pytest.raises(ValueError):
        max_sustainable_scale(sustainable, 2.0, 1.0)


def test_max_sustainable_scale_on_the_simulator_is_deterministic():
    trace = [TraceRequest(0.5 * i, 2000, 20) for i in range(60)]
    config = SimConfig(instances=1, dp_size=2)

    def sustainable(scale: float) -> bool:
        rescaled = [TraceRequest(r.arrival_s / scale, r.prompt_tokens, r.output_tokens) for r in trace]
        return steadiness(simulate(rescaled, config), Slo(ttft_s=2.0, tpot_s=1.0), ranks=2).sustainable

    first = max_sustainable_scale(sustainable, 0.5, 40.0, steps=4)
    assert first == max_sustainable_scale(sustainable, 0.5, 40.0, steps=4)
    assert 0.5 <= first.scale < 40.0


def test_goodput_under_several_slos_matches_the_summary():
    trace = [TraceRequest(0.2 * i, 1500, 30) for i in range(40)]
    result = simulate(trace, SimConfig(instances=1, dp_size=2, limits=InformationLimits()))
    for slo in (Slo(), Slo(ttft_s=0.5, tpot_s=0.05), Slo(ttft_s=0.1, tpot_s=0.2, ttft_per_unloaded=3)):
        summary = result.summary(slo)
        g = result.goodput(slo)
        assert g["slo_attainment"] == summary["slo_attainment"]
        assert g["goodput_rps"] == pytest.approx(summary["goodput_rps"])


def test_cli_simulate_runs_a_preset_and_refuses_it_with_limit_options():
    from click.testing import CliRunner

    from gateway.cli import main

    args = ["simulate", "--trace", "azure-conv", "--duration", "30", "--policy", "sbs", "--no-progress"]
    result = CliRunner().invoke(main, [*args, "--preset", "realistic-vllm", "--prefill-only"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("preset realistic-vllm: vllm steps, 8,192 prefill tokens")
    assert "TPOT mean – ms" in result.output
    refused = CliRunner().invoke(main, [*args, "--preset", "idealised", "--nonstream-share", "0.3"])
    assert refused.exit_code != 0 and "--preset replaces --nonstream-share" in refused.output
