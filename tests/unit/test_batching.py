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
    ("ttft_slo", "tpot_slo", "budget"),
    [
        (1.0, 0.1, 1.0),  # the waiting prompt's first-token slack (1.0 s) is the least
        (0.5, 0.2, 0.5),
        (2.0, 0.05, 1.95),  # the decode's next token is due first: 2.0 + 0.05 - 0.1 s from now
        (0.05, 0.1, 0.1),  # every slack below one TPOT objective: the budget is one TPOT objective
    ],
)
def test_fairbatching_step_budget_is_the_least_slack(ttft_slo: float, tpot_slo: float, budget: float) -> None:
    """A request decodes (its 100-token prefill took 0.1 s); a long prompt arrives. The step lasts its time budget:
    the least slack, at least one TPOT objective; prefill fills what the urgent decode leaves."""
    m = model(batching="fairbatching", ttft_slo_s=ttft_slo, tpot_slo_s=tpot_slo)
    m.add_request("r", 0, 100, 1000)
    assert m.step().duration_s == pytest.approx(0.1)
    m.add_request("q", 0, 100_000, 10)
    result = m.step()
    assert result.decode_reqs_per_rank == [1]
    assert result.duration_s == pytest.approx(budget, abs=1e-3)
    assert abs(result.prefill_tokens_per_rank[0] - (budget - 0.01) * 1000) <= 1


@pytest.mark.parametrize(
    ("prompt", "decoded", "prefilled"),
    [
        (100, 2, 100),  # prefill fits: the decode with slack runs too
        # prefill needs the time: the decode with slack waits; the urgent one (due 0.99 s from now, the budget) runs
        (100_000, 1, 980),
    ],
)
def test_fairbatching_prefill_takes_time_only_from_decodes_with_slack(
    prompt: int, decoded: int, prefilled: int
) -> None:
    m = model(batching="fairbatching", ttft_slo_s=1.0, tpot_slo_s=0.1)
    m.add_request("ahead", 0, 100, 1000)
    for _ in range(21):
        m.step()  # 20 decode steps of 10 ms against a 100 ms objective: "ahead" banks about 1.8 s of slack
    m.add_request("fresh", 0, 100, 1000)
    m.step()  # its prefill: its next token is due about 1.0 s from now
    m.add_request("q", 0, prompt, 10)
    result = m.step()
    assert result.decode_reqs_per_rank == [decoded]
    assert result.prefill_tokens_per_rank == [prefilled]


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
