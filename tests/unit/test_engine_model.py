"""The discrete-step DP+EP engine model: calibration, lockstep, chunked prefill, KV, rank rules."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from gateway.sim.calibration import EngineModelConfig
from gateway.sim.engine_model import EngineModel, StepResult

DEFAULT = EngineModelConfig()


def make_model(dp_size: int = 1, **overrides: Any) -> EngineModel:
    return EngineModel(replace(DEFAULT, **overrides), dp_size)


def run_until_idle(model: EngineModel, max_steps: int = 10_000) -> list[StepResult]:
    results = []
    while model.has_work():
        results.append(model.step())
        assert len(results) <= max_steps
    return results


# --- calibration -----------------------------------------------------------------------------------------


def test_alltoall_is_58_layers_of_deepep_ep32() -> None:
    assert DEFAULT.alltoall_s == pytest.approx(0.0248, rel=0.01)


@pytest.mark.parametrize(
    ("prompt_len", "published_tokens_per_s"),
    [
        (4096, 7800.0),  # DeepSeek: 7.8k tokens/s per H800 at 16k tokens/step of 4k prompts
    ],
)
def test_prefill_throughput_per_rank_matches_deepseek(prompt_len: int, published_tokens_per_s: float) -> None:
    model = make_model(max_prefill_tokens_per_step=16384)
    for i in range(16384 // prompt_len):
        model.add_request(f"r{i}", 0, prompt_len, 1)
    result = model.step()
    assert sum(result.prefill_tokens_per_rank) == 16384
    assert result.duration_s == pytest.approx(2.1, rel=0.10)
    assert 16384 / result.duration_s == pytest.approx(published_tokens_per_s, rel=0.10)


def prefill_step_s(prompt_len: int) -> float:
    model = make_model(max_prefill_tokens_per_step=16384)
    for i in range(16384 // prompt_len):
        model.add_request(f"r{i}", 0, prompt_len, 1)
    return model.step().duration_s


def test_prefill_1k_vs_4k_ratio_matches_lmsys_sglang_h100() -> None:
    # lmsys (May 2025): 57.7k tokens/s at 1k prompts, 50.3k at 4k: same tokens take 1.147x longer at 4k.
    assert prefill_step_s(4096) / prefill_step_s(1024) == pytest.approx(57.7 / 50.3, rel=0.02)


@pytest.mark.parametrize(
    ("running", "context", "expected_s"),
    [
        (128, 4096, 0.055),  # DeepSeek: ≈ 55 ms a step at 128 requests per H800 with 4k context
        (0, 0, 0.0248),  # all-to-all alone
    ],
)
def test_decode_step_formula(running: int, context: int, expected_s: float) -> None:
    step = DEFAULT.alltoall_s + DEFAULT.decode_s(running, running * context)
    assert step == pytest.approx(expected_s, rel=0.10)


def test_decode_step_of_128_requests_with_4k_context_is_about_55_ms() -> None:
    model = make_model()
    for i in range(128):
        model.add_request(f"r{i}", 0, 4000, 500)
    while model.rank_stats()[0].waiting:
        model.step()
    assert model.rank_stats()[0].running == 128
    result = model.step()
    assert sum(result.prefill_tokens_per_rank) == 0
    assert result.decode_reqs_per_rank == [128]
    assert result.duration_s == pytest.approx(0.055, rel=0.10)


# --- lockstep --------------------------------------------------------------------------------------------


def test_step_time_is_set_by_the_heaviest_rank() -> None:
    model = make_model(dp_size=3)
    model.add_request("heavy", 0, 8000, 5)
    model.add_request("light", 1, 100, 5)
    result = model.step()
    heavy = DEFAULT.prefill_chunk_s(8000, 0)
    light = DEFAULT.prefill_chunk_s(100, 0)
    assert result.work_s_per_rank == pytest.approx([heavy, light, 0.0])
    assert result.duration_s == pytest.approx(DEFAULT.alltoall_s + heavy)
    assert result.prefill_tokens_per_rank == [8000, 100, 0]


def test_idle_ranks_run_dummy_steps_and_no_work_means_no_step() -> None:
    model = make_model(dp_size=4)
    assert not model.has_work()
    empty = model.step()
    assert (empty.duration_s, empty.tokens) == (0.0, [])
    model.add_request("a", 3, 10, 1)
    result = model.step()
    assert result.duration_s == pytest.approx(DEFAULT.alltoall_s + DEFAULT.prefill_chunk_s(10, 0))
    assert [t.rank for t in result.tokens] == [3]


def test_requests_added_between_steps_join_the_next_step() -> None:
    model = make_model(dp_size=1)
    model.add_request("a", 0, 10, 3)
    first = model.step()
    model.add_request("b", 0, 10, 3)
    second = model.step()
    assert [(t.request_id, t.index) for t in first.tokens] == [("a", 0)]
    assert [(t.request_id, t.index) for t in second.tokens] == [("a", 1), ("b", 0)]
    assert second.decode_reqs_per_rank == [1]
    assert second.prefill_tokens_per_rank == [10]


# --- chunked prefill and output tokens -------------------------------------------------------------------


def test_chunked_prefill_splits_a_long_prompt_over_steps() -> None:
    model = make_model(max_prefill_tokens_per_step=8192)
    model.add_request("long", 0, 20_000, 2)
    steps = [model.step() for _ in range(3)]
    assert [s.prefill_tokens_per_rank[0] for s in steps] == [8192, 8192, 3616]
    assert [len(s.tokens) for s in steps] == [0, 0, 1]
    # the second chunk attends over the first: same size, more work
    assert steps[1].work_s_per_rank[0] == pytest.approx(DEFAULT.prefill_chunk_s(8192, 8192))
    assert steps[1].work_s_per_rank[0] > steps[0].work_s_per_rank[0]
    assert model.rank_stats()[0].running == 1


def test_budget_is_shared_fcfs_within_a_rank() -> None:
    model = make_model(max_prefill_tokens_per_step=1000)
    model.add_request("a", 0, 700, 1)
    model.add_request("b", 0, 700, 1)
    first = model.step()
    assert first.prefill_tokens_per_rank == [1000]
    assert [t.request_id for t in first.tokens] == ["a"]
    assert model.rank_stats()[0].waiting_prompt_tokens == 400


def test_first_token_is_emitted_at_the_end_of_the_prefill_step() -> None:
    model = make_model()
    model.add_request("a", 0, 100, 3)
    tokens = [[(t.index, t.finished) for t in model.step().tokens] for _ in range(3)]
    assert tokens == [[(0, False)], [(1, False)], [(2, True)]]
    assert not model.has_work()


@pytest.mark.parametrize(("prompt", "output"), [(1, 1), (10, 7), (5000, 1), (9000, 40), (100, 300)])
def test_exactly_the_requested_number_of_output_tokens(prompt: int, output: int) -> None:
    model = make_model(dp_size=2)
    model.add_request("x", 1, prompt, output)
    model.add_request("y", 0, 50, 5)
    tokens = [t for r in run_until_idle(model) for t in r.tokens if t.request_id == "x"]
    assert [t.index for t in tokens] == list(range(output))
    assert [t.finished for t in tokens] == [False] * (output - 1) + [True]


def test_same_inputs_give_the_same_steps() -> None:
    def trace() -> list[StepResult]:
        model = make_model(dp_size=3, max_prefill_tokens_per_step=512)
        for i in range(12):
            model.add_request(f"r{i}", i % 3, 100 + 97 * i, 1 + i)
        return run_until_idle(model)

    assert trace() == trace()


# --- KV cache and limits ---------------------------------------------------------------------------------


def test_abort_frees_kv_wherever_the_request_is() -> None:
    model = make_model(max_prefill_tokens_per_step=1000)
    model.add_request("running", 0, 500, 100)
    model.add_request("chunking", 0, 3000, 100)
    model.add_request("queued", 0, 100, 100)
    model.step()
    model.step()
    stats = model.rank_stats()[0]
    assert (stats.running, stats.waiting, stats.kv_used_tokens) == (1, 2, 500 + 2 + 1500)
    assert model.abort("running") and model.abort("chunking") and model.abort("queued")
    assert not model.abort("running")
    assert model.rank_stats()[0].kv_used_tokens == 0
    assert not model.has_work()


def test_finished_requests_free_their_kv() -> None:
    model = make_model()
    model.add_request("a", 0, 100, 4)
    run_until_idle(model)
    assert model.rank_stats()[0].kv_used_tokens == 0
    model.add_request("a", 0, 100, 4)  # the id is free again


def test_request_waits_while_its_kv_reservation_does_not_fit() -> None:
    model = make_model(kv_capacity_tokens=1000)
    model.add_request("a", 0, 600, 300)  # reserves 900
    model.add_request("b", 0, 200, 150)  # needs 350 > 100 free: waits for "a"
    model.add_request("c", 0, 10, 10)  # behind "b": head-of-line blocked
    first = model.step()
    assert first.prefill_tokens_per_rank == [600]
    steps = run_until_idle(model)
    admitted_at = next(i for i, s in enumerate(steps) if s.prefill_tokens_per_rank[0])
    a_done = next(i for i, s in enumerate(steps) if any(t.finished and t.request_id == "a" for t in s.tokens))
    assert admitted_at == a_done + 1
    assert steps[admitted_at].prefill_tokens_per_rank == [210]


def test_kv_usage_is_a_fraction_of_capacity() -> None:
    model = make_model(kv_capacity_tokens=1000)
    model.add_request("a", 0, 250, 10)
    model.step()
    stats = model.rank_stats()[0]
    assert (stats.kv_used_tokens, stats.kv_capacity_tokens, stats.kv_usage) == (251, 1000, 0.251)


def test_max_running_requests_caps_admission() -> None:
    model = make_model(max_running_requests=2)
    for i in range(3):
        model.add_request(f"r{i}", 0, 10, 5)
    result = model.step()
    assert result.prefill_tokens_per_rank == [20]
    assert (model.rank_stats()[0].running, model.rank_stats()[0].waiting) == (2, 1)


@pytest.mark.parametrize(
    ("rank", "request_id", "prompt", "output", "message"),
    [
        (2, "new", 10, 10, "rank"),
        (-1, "new", 10, 10, "rank"),
        (0, "dup", 10, 10, "duplicate"),
        (0, "new", 0, 10, ">= 1"),
        (0, "new", 10, 0, ">= 1"),
        (0, "new", 599_999, 2, "KV capacity"),
    ],
)
def test_add_request_rejects_bad_input(rank: int, request_id: str, prompt: int, output: int, message: str) -> None:
    model = make_model(dp_size=2)
    model.add_request("dup", 0, 10, 10)
    with pytest.raises(ValueError, match=message):
        model.add_request(request_id, rank, prompt, output)


@pytest.mark.parametrize(
    ("overrides", "dp_size"),
    [({"max_prefill_tokens_per_step": 0}, 1), ({"alltoall_s": -1.0}, 1), ({}, 0)],
)
def test_bad_config_is_rejected(overrides: dict[str, Any], dp_size: int) -> None:
    with pytest.raises(ValueError):
        EngineModel(replace(DEFAULT, **overrides), dp_size)


# --- internal DP dispatch rules --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("queued", "expected"),
    [
        # (rank, prompt, output) requests already placed; after one step the 1-token prompts are running
        ([], 0),
        ([(0, 1, 9)], 1),  # rank 0: running 1 → score 1
        ([(0, 1, 9), (1, 1, 9), (1, 1, 9)], 2),
        ([(0, 1, 9), (0, 1, 9), (0, 1, 9), (1, 1, 9), (1, 1, 9), (1, 1, 9), (1, 1, 9), (2, 1, 9)], 2),
    ],
)
def test_vllm_rule_picks_least_waiting_times_4_plus_running(queued: list[tuple[int, int, int]], expected: int) -> None:
    model = make_model(dp_size=3)
    for i, (rank, prompt, output) in enumerate(queued):
        model.add_request(f"r{i}", rank, prompt, output)
    model.step()
    assert model.pick_rank_vllm() == expected


def test_vllm_rule_weighs_waiting_four_times_running() -> None:
    model = make_model(dp_size=2, max_running_requests=3)
    for i in range(3):
        model.add_request(f"run{i}", 1, 1, 50)
    model.step()  # rank 1: 3 running (score 3)
    model.add_request("wait", 0, 1, 50)  # rank 0: 1 waiting (score 4)
    assert model.pick_rank_vllm() == 1
    model.add_request("wait2", 1, 1, 50)  # rank 1: 3 running + 1 waiting (score 7)
    assert model.pick_rank_vllm() == 0


def test_round_robin_cycles_through_ranks() -> None:
    model = make_model(dp_size=3)
    assert [model.pick_rank_round_robin() for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
