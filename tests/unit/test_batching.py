"""Batch formation in the engine model: Sarathi's stall-free batching and FairBatching's time budget from slack.
Deterministic: simple linear costs (1 ms a prompt token, 10 ms a decode request, no attention, no all-to-all)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from gateway.sim.calibration import EngineModelConfig
from gateway.sim.engine_model import EngineModel

LINEAR = replace(
    EngineModelConfig(),
    alltoall_s=0.0,
    prefill_token_s=1e-3,
    prefill_attn_s=0.0,
    decode_req_s=1e-2,
    decode_kv_s=0.0,
    max_prefill_tokens_per_step=1_000_000,
)


def model(**overrides: Any) -> EngineModel:
    return EngineModel(replace(LINEAR, **overrides), 1)


@pytest.mark.parametrize(
    ("batching", "prefill"),
    [("default", 100), ("stall_free", 70)],  # stall-free: 30 decode tokens come out of the budget of 100
)
def test_stall_free_counts_decodes_against_the_token_budget(batching: Any, prefill: int) -> None:
    m = model(batching=batching, max_prefill_tokens_per_step=100)
    for i in range(30):
        m.add_request(f"d{i}", 0, 1, 1000)
    m.step()
    m.add_request("p", 0, 1000, 10)
    result = m.step()
    assert result.decode_reqs_per_rank == [30]
    assert result.prefill_tokens_per_rank == [prefill]


def test_stall_free_is_the_vllm_step() -> None:
    shipped = EngineModelConfig.as_shipped("vllm", 2)
    steps = []
    for config in (shipped, replace(shipped, batching="stall_free")):
        m = EngineModel(config, 2)
        for i in range(40):
            m.add_request(str(i), i % 2, 3000 + 37 * i, 20 + i)
        steps.append([m.step() for _ in range(30)])
    assert steps[0] == steps[1]


@pytest.mark.parametrize(
    ("ttft_slo", "tpot_slo", "decode_steps", "budget", "decoded"),
    [
        # the decode's slack (1.0 s) is above half the TTFT objective: capped there; with a TPOT objective of slack
        # to spare beyond the step, the decode gives its time to prefill
        (1.0, 0.1, 0, 0.5, 0),
        (0.5, 0.2, 0, 0.25, 0),
        # 200 steps of 10 ms against a 5 ms objective ate 1 s of slack (1.905 - 1.0): the decode is due, it runs
        (2.0, 0.005, 200, 0.905, 1),
        (0.1, 0.2, 0, 0.2, 1),  # below one TPOT objective: the budget is one TPOT objective
    ],
)
def test_fairbatching_step_budget_is_the_decodes_least_slack(
    ttft_slo: float, tpot_slo: float, decode_steps: int, budget: float, decoded: int
) -> None:
    """A request decodes (its 100-token prefill took 0.1 s); a long prompt arrives. The step lasts its time budget:
    the least slack of the decodes, between one TPOT objective and half the TTFT objective; prefill fills what the
    decode leaves."""
    m = model(batching="fairbatching", ttft_slo_s=ttft_slo, tpot_slo_s=tpot_slo)
    m.add_request("r", 0, 100, 10_000)
    assert m.step().duration_s == pytest.approx(0.1)
    for _ in range(decode_steps):
        assert m.step().duration_s == pytest.approx(0.01)
    m.add_request("q", 0, 100_000, 10)
    result = m.step()
    assert result.decode_reqs_per_rank == [decoded]
    assert result.duration_s == pytest.approx(budget, abs=1e-3)
    assert abs(result.prefill_tokens_per_rank[0] - (budget - 0.01 * decoded) * 1000) <= 1


def test_fairbatching_step_without_decodes_is_half_the_ttft_objective() -> None:
    m = model(batching="fairbatching", ttft_slo_s=1.0, tpot_slo_s=0.1)
    m.add_request("q", 0, 100_000, 10)
    assert m.step().prefill_tokens_per_rank == [500]


@pytest.mark.parametrize(
    ("prompt", "decoded", "prefilled"),
    [
        (100, 2, 100),  # prefill fits: the decode with slack runs too
        (100_000, 1, 790),  # prefill needs the time: the decode with slack waits, the urgent one runs
    ],
)
def test_fairbatching_prefill_takes_time_only_from_decodes_with_slack(
    prompt: int, decoded: int, prefilled: int
) -> None:
    """ "late" decodes 10 ms steps against a 5 ms objective until 0.8 s of slack is left; "fresh" has just had its
    first token (1.9 s of slack). A prompt arrives: the budget is 0.8 s."""
    m = model(batching="fairbatching", ttft_slo_s=2.0, tpot_slo_s=0.005)
    m.add_request("late", 0, 100, 10_000)
    for _ in range(201):
        m.step()
    m.add_request("fresh", 0, 100, 10_000)
    m.step()
    m.add_request("q", 0, prompt, 10)
    result = m.step()
    assert result.decode_reqs_per_rank == [decoded]
    assert abs(result.prefill_tokens_per_rank[0] - prefilled) <= 1


def test_fairbatching_without_prefill_decodes_everything() -> None:
    m = model(batching="fairbatching")
    for i in range(5):
        m.add_request(str(i), 0, 10, 100)
    m.step()
    assert m.step().decode_reqs_per_rank == [5]


@pytest.mark.parametrize(
    "overrides",
    [
        {"batching": "fairbatching", "step_composition": "vllm", "admission": "vllm"},
        {"batching": "stall_free", "step_composition": "sglang", "admission": "sglang"},
        {"batching": "fairbatching", "tpot_slo_s": 0.0},
    ],
)
def test_batching_that_the_admission_cannot_run_is_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        replace(LINEAR, **overrides)


@pytest.mark.parametrize(
    ("profile", "flavor", "batching", "expected"),
    [
        ("idealised", "sglang", "fairbatching", "fairbatching"),
        ("idealised", "sglang", "stall-free", "stall_free"),
        ("as-shipped", "vllm", "stall-free", "stall_free"),
        ("as-shipped", "sglang", "stall-free", None),  # SGLang's own is --enable-mixed-chunk
        ("as-shipped", "vllm", "fairbatching", None),  # FairBatching's step does not preempt
    ],
)
def test_batching_on_the_command_line(profile: str, flavor: str, batching: str, expected: str | None) -> None:
    import click

    from gateway.cli.engine_options import engine_model_config

    if expected is None:
        with pytest.raises(click.UsageError, match="--batching"):
            engine_model_config(profile, flavor, 8, None, batching=batching)  # type: ignore[arg-type]
        return
    config = engine_model_config(profile, flavor, 8, None, batching=batching, ttft_slo=1.5, tpot_slo=0.05)  # type: ignore[arg-type]
    assert (config.batching, config.ttft_slo_s, config.tpot_slo_s) == (expected, 1.5, 0.05)
