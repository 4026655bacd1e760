"""The engine model as the engines ship (EngineModelConfig.as_shipped and the options behind it): budgets, step
composition, join lag, EP-shared routed-expert cost, admission, preemption and retraction, running-request caps."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from gateway.sim.calibration import (
    DEEPSEEK_V3_MOE_LAYERS,
    PRODUCTION_PREFILL_TOKENS_PER_S,
    ROUTED_EXPERT_LINEAR_FRACTION,
    EngineModelConfig,
    NewTokenRatio,
    alltoall_s_for_ep,
)
from gateway.sim.engine_defaults import deepep_alltoall_per_layer_s
from gateway.sim.engine_model import EngineModel, StepResult

IDEALISED = EngineModelConfig()


def model(dp_size: int = 1, **overrides: Any) -> EngineModel:
    return EngineModel(replace(IDEALISED, **overrides), dp_size)


def run_until_idle(m: EngineModel, max_steps: int = 10_000) -> list[StepResult]:
    results = []
    while m.has_work():
        results.append(m.step())
        assert len(results) <= max_steps
    return results


# --- budgets and caps per flavour and DP size ------------------------------------------------------------


@pytest.mark.parametrize(
    ("flavor", "dp_size", "flags", "budget", "max_running"),
    [
        ("sglang", 1, {}, 8192, 2048),  # one rank: no DP attention, no division
        ("sglang", 8, {}, 1024, 2048),  # 8192 // 8; request pool from 600k KV and a 163,840-token context
        ("sglang", 16, {}, 512, 2048),
        ("sglang", 32, {}, 256, 2048),
        ("sglang", 32, {"chunked_prefill_size": 524_288}, 16_384, 2048),  # the lmsys large-EP prefill setting
        ("sglang", 8, {"max_running_requests": 8192}, 1024, 1024),  # divided by the DP size
        ("vllm", 1, {}, 8192, 1024),
        ("vllm", 16, {}, 8192, 1024),  # per engine core, whatever the DP size
        ("vllm", 8, {"max_num_batched_tokens": 2048, "max_num_seqs": 256}, 2048, 256),
    ],
)
def test_as_shipped_budget_and_running_cap_per_rank(
    flavor: Any, dp_size: int, flags: dict[str, Any], budget: int, max_running: int
) -> None:
    config = EngineModelConfig.as_shipped(flavor, dp_size, **flags)
    assert config.max_prefill_tokens_per_step == budget
    assert config.max_running_requests == max_running


@pytest.mark.parametrize(
    ("flavor", "composition", "admission", "lag", "idle_joins"),
    [("sglang", "sglang", "sglang", 1, False), ("vllm", "vllm", "vllm", 1, True)],
)
def test_as_shipped_rules_per_flavour(
    flavor: Any, composition: str, admission: str, lag: int, idle_joins: bool
) -> None:
    config = EngineModelConfig.as_shipped(flavor, 8)
    assert (config.step_composition, config.admission) == (composition, admission)
    assert (config.join_lag_steps, config.idle_rank_joins_next_step) == (lag, idle_joins)
    assert config.routed_expert_fraction == pytest.approx(0.574, abs=0.001)
    assert config.alltoall_s == pytest.approx(alltoall_s_for_ep(8))


def test_sglang_dp_attention_scales_conservativeness_by_0_3() -> None:
    ratio = EngineModelConfig.as_shipped("sglang", 8).new_token_ratio
    assert ratio.start == pytest.approx(0.21)
    assert ratio.floor == pytest.approx(0.21 * 0.14)
    assert ratio.decay == pytest.approx((0.21 - 0.21 * 0.14) / 600)
    assert EngineModelConfig.as_shipped("sglang", 1).new_token_ratio.start == pytest.approx(0.7)


@pytest.mark.parametrize(
    ("flavor", "flags"),
    [
        ("sglang", {"max_num_seqs": 64}),
        ("sglang", {"max_num_batched_tokens": 64}),
        ("vllm", {"chunked_prefill_size": 64}),
        ("vllm", {"enable_mixed_chunk": True}),
        ("vllm", {"max_running_requests": 64}),
        ("tgi", {}),
    ],
)
def test_a_flag_of_the_other_engine_is_refused(flavor: Any, flags: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        EngineModelConfig.as_shipped(flavor, 8, **flags)


@pytest.mark.parametrize(
    ("ep_size", "per_layer_us"),
    [
        (8, 77 + 114),
        (16, 118 + 195),
        (32, 155 + 273),
        (128, 192 + 369),
        (4, 77 + 114),  # below the table: clamped
        (512, 194 + 360),  # above: clamped
        (24, 313 + (428 - 313) * 0.5849625),  # log2-interpolated between EP16 and EP32
    ],
)
def test_alltoall_follows_deepep_low_latency_table(ep_size: int, per_layer_us: float) -> None:
    assert deepep_alltoall_per_layer_s(ep_size) == pytest.approx(per_layer_us * 1e-6, rel=1e-6)
    assert alltoall_s_for_ep(ep_size) == pytest.approx(DEEPSEEK_V3_MOE_LAYERS * per_layer_us * 1e-6, rel=1e-6)


@pytest.mark.parametrize(
    "overrides",
    [
        {"admission": "vllm"},  # vLLM's preemption lives in its running-first step
        {"admission": "sglang", "step_composition": "vllm"},  # SGLang's retraction lives in its decode step
        {"join_lag_steps": 2},
        {"routed_expert_fraction": 1.5},
        {"kv_block_size": 0},
    ],
)
def test_settings_that_cannot_hold_are_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        replace(IDEALISED, **overrides)


# --- calibration under the as-shipped profiles -----------------------------------------------------------


@pytest.mark.parametrize("flavor", ["sglang", "vllm"])
def test_as_shipped_timing_keeps_the_published_points_at_ep32(flavor: Any) -> None:
    """The published points are at EP32 (prefill) and a 55 ms decode step; as shipped at DP 32 the model stays
    within 10% of both (the budget raised to the calibration's 16k)."""
    config = replace(EngineModelConfig.as_shipped(flavor, 32), max_prefill_tokens_per_step=16_384)
    assert config.calibration_prefill_tokens_per_s() == pytest.approx(7800, rel=0.10)
    assert config.alltoall_s + config.decode_s(128, 128 * 4096) == pytest.approx(0.055, rel=0.10)


@pytest.mark.parametrize("rate", [PRODUCTION_PREFILL_TOKENS_PER_S, 6000.0])
def test_with_prefill_rate_hits_the_rate_and_keeps_the_1k_4k_ratio(rate: float) -> None:
    config = IDEALISED.with_prefill_rate(rate)
    assert config.calibration_prefill_tokens_per_s() == pytest.approx(rate, rel=1e-9)
    assert config.decode_req_s == IDEALISED.decode_req_s
    ratio = config.prefill_token_s / config.prefill_attn_s
    assert ratio == pytest.approx(IDEALISED.prefill_token_s / IDEALISED.prefill_attn_s)


def test_routed_expert_fraction_is_derived_from_the_deepseek_v3_config() -> None:
    routed = 8 * 3 * 7168 * 2048 * 58
    shared_dense = 3 * 7168 * 2048 * 58 + 3 * 3 * 7168 * 18432
    attention = (7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168) * 61
    derived = routed / (routed + shared_dense + attention)
    assert derived == pytest.approx(ROUTED_EXPERT_LINEAR_FRACTION, rel=1e-3)


# --- step composition ------------------------------------------------------------------------------------


def start_decoding(m: EngineModel, rank: int, n: int, prompt: int = 100, output: int = 50) -> None:
    for i in range(n):
        m.add_request(f"d{rank}-{i}", rank, prompt, output)
    while any(s.waiting for s in m.rank_stats()):
        m.step()


@pytest.mark.parametrize(
    ("composition", "mixed", "prefill", "decodes_rank0"),
    [
        ("idealised", False, 1000, 3),  # decode all and prefill a full budget
        ("sglang", False, 1000, 0),  # a prefill batch runs alone; its rank's decodes wait
        ("sglang", True, 997, 3),  # mixed chunk: the 3 decodes ride along and come out of the budget
        ("vllm", False, 997, 3),  # decodes first, counted against the budget, then new prefill
    ],
)
def test_step_composition_per_flavour(composition: Any, mixed: bool, prefill: int, decodes_rank0: int) -> None:
    m = model(dp_size=2, step_composition=composition, enable_mixed_chunk=mixed, max_prefill_tokens_per_step=1000)
    start_decoding(m, 0, 3)
    start_decoding(m, 1, 2)
    m.add_request("new", 0, 5000, 5)
    result = m.step()
    assert result.prefill_tokens_per_rank == [prefill, 0]
    assert result.decode_reqs_per_rank == [decodes_rank0, 2]  # the other rank decodes either way
    assert sorted(t.request_id for t in result.tokens if t.rank == 0) == sorted(f"d0-{i}" for i in range(decodes_rank0))


def test_sglang_rank_decodes_when_no_prefill_batch_can_be_formed() -> None:
    m = model(step_composition="sglang", max_running_requests=3)
    start_decoding(m, 0, 3)
    m.add_request("blocked", 0, 100, 5)  # no running slot: no prefill batch, so the rank decodes
    result = m.step()
    assert (result.prefill_tokens_per_rank, result.decode_reqs_per_rank) == ([0], [3])


def test_vllm_decodes_take_the_budget_before_new_prefill() -> None:
    m = model(step_composition="vllm", max_prefill_tokens_per_step=2)
    for i in range(3):
        m.add_request(f"r{i}", 0, 1, 10)
    assert m.step().prefill_tokens_per_rank == [2]  # r0, r1 prefill; r2 waits for budget
    result = m.step()
    assert (result.decode_reqs_per_rank, result.prefill_tokens_per_rank) == ([2], [0])


# --- join lag --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lag", "idle_joins", "late_rank", "joins_at"),
    [
        (0, False, 0, 1),  # no lag: the next step
        (1, False, 0, 2),  # its rank is busy: the step after next
        (1, True, 0, 2),
        (1, False, 1, 2),  # SGLang: its rank is idle but another is not, so an IDLE batch was launched ahead
        (1, True, 1, 1),  # vLLM: an idle engine core schedules nothing ahead, so it joins the next step
    ],
)
def test_join_lag(lag: int, idle_joins: bool, late_rank: int, joins_at: int) -> None:
    m = model(dp_size=2, join_lag_steps=lag, idle_rank_joins_next_step=idle_joins)
    m.add_request("early", 0, 100, 10)
    m.step()  # step 0 runs; "late" arrives meanwhile
    m.add_request("late", late_rank, 100, 10)
    first_token = {}
    for index in range(1, 4):
        for t in m.step().tokens:
            if t.index == 0:
                first_token[t.request_id] = index
    assert first_token["late"] == joins_at


def test_join_lag_is_void_when_the_instance_would_idle() -> None:
    m = model(dp_size=2, join_lag_steps=1)
    m.add_request("a", 0, 100, 1)
    m.step()  # "a" finishes in this step
    m.add_request("b", 1, 100, 1)  # arrives during it; nothing else would run next
    assert [t.request_id for t in m.step().tokens] == ["b"]


def test_a_request_added_while_idle_joins_at_once() -> None:
    m = model(join_lag_steps=1)
    assert m.step().duration_s == 0.0
    m.add_request("a", 0, 100, 1)
    assert [t.request_id for t in m.step().tokens] == ["a"]


# --- EP-shared routed-expert cost ------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.3, ROUTED_EXPERT_LINEAR_FRACTION, 1.0])
def test_routed_expert_share_follows_the_mean_over_ranks(fraction: float) -> None:
    m = model(dp_size=4, routed_expert_fraction=fraction)
    m.add_request("a", 0, 4000, 5)
    result = m.step()
    own = IDEALISED.prefill_chunk_s(4000, 0)
    shared = fraction * IDEALISED.prefill_token_s * 4000
    assert result.duration_s == pytest.approx(IDEALISED.alltoall_s + own - shared + shared / 4)
    assert result.work_s_per_rank[1] == pytest.approx(shared / 4)


def test_a_balanced_step_costs_the_same_with_or_without_sharing() -> None:
    durations = []
    for fraction in (0.0, 0.57):
        m = model(dp_size=3, routed_expert_fraction=fraction)
        for rank in range(3):
            m.add_request(f"r{rank}", rank, 2000, 5)
        durations.append(m.step().duration_s)
    assert durations[0] == pytest.approx(durations[1])


# --- admission -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kv_capacity", "block", "admitted"),
    [
        (1000, 16, 2),  # 480-token prompts take 30 blocks each; 62 blocks hold two, not three
        (1000, 1, 2),  # 1000 tokens hold two (960), not three
        (1500, 16, 3),  # 93 blocks hold three (90)
    ],
)
def test_vllm_admits_on_the_prompt_blocks_not_the_output(kv_capacity: int, block: int, admitted: int) -> None:
    m = model(step_composition="vllm", admission="vllm", kv_block_size=block, kv_capacity_tokens=kv_capacity)
    for i in range(3):
        m.add_request(f"r{i}", 0, 480, 500)  # prompt + output 980 each: reserving outputs would admit one
    result = m.step()
    assert result.prefill_tokens_per_rank == [480 * admitted]


def test_sglang_admission_holds_back_the_running_requests_estimated_output() -> None:
    ratio = NewTokenRatio(schedule_conservativeness=1.0)  # starts at 0.7
    m = model(step_composition="sglang", admission="sglang", kv_capacity_tokens=10_000, new_token_ratio=ratio)
    m.add_request("running", 0, 100, 50, max_new_tokens=4000)
    m.step()
    # free 10,000 - 101 = 9,899; held back 0.7 x (4000 - 1) = 2,799.3; a candidate needs prompt + max_new
    m.add_request("fits", 0, 3000, 5, max_new_tokens=4000)  # 7,000 < 7,099.7: admitted, 99.7 left
    m.add_request("too-big", 0, 90, 5, max_new_tokens=10)  # 100 >= 99.7: refused, and it blocks the queue
    m.add_request("after", 0, 10, 5, max_new_tokens=10)
    assert m.step().prefill_tokens_per_rank == [3000]


@pytest.mark.parametrize(
    ("max_new", "ignore_eos", "admitted"),
    [
        (4000, False, True),  # 0.7 x 3999 held back: 2000 + 4000 < 9,899 - 2,799.3
        (4000, True, False),  # ignore_eos: all 3,999 held back: 6,000 >= 9,899 - 3,999
        (None, False, True),  # no max_tokens: the rest of the context, clipped to 4096: 6,096 < 7,099.7
    ],
)
def test_sglang_new_token_ratio_and_ignore_eos(max_new: int | None, ignore_eos: bool, admitted: bool) -> None:
    m = model(step_composition="sglang", admission="sglang", kv_capacity_tokens=10_000)
    m.add_request("running", 0, 100, 50, max_new_tokens=4000, ignore_eos=ignore_eos)
    m.step()
    m.add_request("candidate", 0, 2000, 5, max_new_tokens=max_new)
    assert (m.step().prefill_tokens_per_rank == [2000]) is admitted


def test_sglang_ratio_decays_per_decode_step_and_resets_when_idle() -> None:
    ratio = NewTokenRatio(decay_steps=10)
    m = model(step_composition="sglang", admission="sglang", new_token_ratio=ratio)
    m.add_request("a", 0, 100, 30)
    m.step()  # prefill
    for _ in range(5):
        m.step()  # decode steps
    assert m.rank_stats()[0].new_token_ratio == pytest.approx(ratio.start - 5 * ratio.decay)
    for _ in range(20):
        m.step()
    assert m.rank_stats()[0].new_token_ratio == pytest.approx(ratio.floor)
    run_until_idle(m)
    m.step()  # idle
    assert m.rank_stats()[0].new_token_ratio == pytest.approx(ratio.start)


def test_reserve_output_admission_is_the_idealised_default() -> None:
    m = model(kv_capacity_tokens=1000)
    m.add_request("a", 0, 480, 500)
    m.add_request("b", 0, 480, 500)
    assert m.step().prefill_tokens_per_rank == [480]


# --- preemption and retraction ---------------------------------------------------------------------------


def test_vllm_preempts_the_newest_running_request_and_recomputes_it() -> None:
    m = model(step_composition="vllm", admission="vllm", kv_capacity_tokens=250, max_prefill_tokens_per_step=1000)
    m.add_request("old", 0, 100, 60)
    m.add_request("new", 0, 100, 60)
    first = m.step()
    assert {t.request_id for t in first.tokens} == {"old", "new"}  # both admitted on their prompt blocks
    tokens: dict[str, list[int]] = {"old": [0], "new": [0]}
    preempted_at = None
    for step in range(200):
        if not m.has_work():
            break
        result = m.step()
        for t in result.tokens:
            tokens[t.request_id].append(t.index)
        if preempted_at is None and m.rank_stats()[0].preemptions:
            preempted_at = step
            stats = m.rank_stats()[0]
            assert (stats.running, stats.waiting) == (1, 1)
            # "new" went back to the queue to prefill its prompt and its output so far
            assert stats.waiting_prompt_tokens == 100 + len(tokens["new"])
    assert preempted_at is not None
    assert tokens["old"] == list(range(60)) and tokens["new"] == list(range(60))  # no token lost or repeated
    assert m.rank_stats()[0].kv_used_tokens == 0


def test_vllm_admits_nothing_new_in_a_step_that_preempted() -> None:
    m = model(step_composition="vllm", admission="vllm", kv_capacity_tokens=205, max_prefill_tokens_per_step=1000)
    m.add_request("a", 0, 100, 50)
    m.add_request("b", 0, 100, 50)
    m.step()
    while not m.rank_stats()[0].preemptions:
        result = m.step()
    assert result.prefill_tokens_per_rank == [0]


def test_sglang_retracts_the_request_with_fewest_outputs_and_longest_prompt() -> None:
    m = model(step_composition="sglang", admission="sglang", kv_capacity_tokens=1000, max_running_requests=3)
    out: dict[str, int] = {"short": 0, "long": 0, "mid": 0}
    m.add_request("short", 0, 100, 300, max_new_tokens=10)
    m.step()
    m.step()  # "short" has 2 tokens out
    m.add_request("long", 0, 300, 300, max_new_tokens=10)
    m.add_request("mid", 0, 200, 300, max_new_tokens=10)
    m.step()  # both prefill (the ratio lets them in: max_new_tokens is 10); "short" waits this step
    out["short"] = 2
    out["long"] = out["mid"] = 1
    while not m.rank_stats()[0].preemptions:
        result = m.step()
        for t in result.tokens:
            out[t.request_id] += 1
    decoded = {t.request_id for t in result.tokens}
    assert {"short", "long", "mid"} - decoded == {"long"}  # as few tokens out as "mid", but the longer prompt
    kept = [out[r] - 1 for r in decoded]  # tokens out before this step
    assert m.rank_stats()[0].new_token_ratio == pytest.approx(min(1.0, (sum(kept) + 20 * 2) / (2 * 10 + 1)))
    results = run_until_idle(m)
    assert sum(t.finished for r in results for t in r.tokens) == 3


# --- running-request caps --------------------------------------------------------------------------------


@pytest.mark.parametrize("composition", ["idealised", "sglang", "vllm"])
def test_max_running_requests_caps_admission(composition: Any) -> None:
    admission = {"idealised": "reserve_output", "sglang": "sglang", "vllm": "vllm"}[composition]
    m = model(step_composition=composition, admission=admission, max_running_requests=2)
    for i in range(3):
        m.add_request(f"r{i}", 0, 10, 20)
    result = m.step()
    assert result.prefill_tokens_per_rank == [20]
    assert m.rank_stats()[0].waiting == 1


@pytest.mark.parametrize(("flavor", "dp_size"), [("sglang", 8), ("vllm", 8), ("sglang", 16)])
def test_as_shipped_engines_serve_a_mixed_load_to_the_end(flavor: Any, dp_size: int) -> None:
    m = EngineModel(replace(EngineModelConfig.as_shipped(flavor, dp_size), kv_capacity_tokens=20_000), dp_size)
    for i in range(120):
        m.add_request(f"r{i}", i % dp_size, 200 + 97 * i % 3000, 1 + 37 * i % 400)
    results = run_until_idle(m)
    finished = sorted(t.request_id for r in results for t in r.tokens if t.finished)
    assert finished == sorted(f"r{i}" for i in range(120))
    assert all(s.kv_used_tokens == 0 for s in m.rank_stats())
