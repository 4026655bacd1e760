"""P/D disaggregation in the engine model: a prefill rank's held KV, a decode rank's pre-allocation queue and KV
transfers (gateway.sim.engine.pd)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from gateway.sim.calibration import DEEPSEEK_V3_KV_BYTES_PER_TOKEN, RDMA_NIC_BYTES_PER_S, EngineModelConfig, Role
from gateway.sim.engine_model import EngineModel

DEFAULT = EngineModelConfig()


def make_model(role: Role, dp_size: int = 2, **overrides: Any) -> EngineModel:
    return EngineModel(replace(DEFAULT, role=role, **overrides), dp_size)


def test_defaults_are_off_and_sourced() -> None:
    assert DEFAULT.role == "mixed"
    assert DEFAULT.kv_lease_s is None
    assert DEEPSEEK_V3_KV_BYTES_PER_TOKEN == 70_272  # (512 + 64) x 2 bytes x 61 layers
    assert RDMA_NIC_BYTES_PER_S == 50e9
    assert DEFAULT.kv_transfer_s(4096) == pytest.approx(4096 * 70_272 / 50e9)  # about 5.8 ms


def test_mixed_model_refuses_pd_requests() -> None:
    model = EngineModel(DEFAULT, 1)
    with pytest.raises(ValueError, match="hold_kv needs role='prefill'"):
        model.add_request("a", 0, 100, 1, hold_kv=True)
    with pytest.raises(ValueError, match="remote_prefill role='decode'"):
        model.add_request("b", 0, 100, 4, remote_prefill=True)
    assert model.advance(10.0) == []
    assert model.next_event_s() is None


def test_prefill_holds_kv_until_released() -> None:
    model = make_model("prefill")
    model.add_request("a", 1, 1000, 1, hold_kv=True)
    result = model.step()
    assert [(t.request_id, t.index, t.finished) for t in result.tokens] == [("a", 0, True)]
    stats = model.rank_stats()[1]
    assert (stats.running, stats.held, stats.kv_used_tokens) == (0, 1, 1001)
    assert not model.has_work()
    assert model.release_held("a")
    assert model.rank_stats()[1].kv_used_tokens == 0
    assert not model.release_held("a")


def test_held_kv_counts_against_idealised_admission() -> None:
    model = make_model("prefill", dp_size=1, kv_capacity_tokens=2000)
    model.add_request("a", 0, 1500, 1, hold_kv=True)
    model.step()
    model.add_request("b", 0, 1000, 1, hold_kv=True)
    assert model.step().prefill_tokens_per_rank == [0]  # b waits: a's 1,501 held tokens leave too little
    model.release_held("a")
    assert model.step().prefill_tokens_per_rank == [1000]


def test_held_kv_lease_expires() -> None:
    model = make_model("prefill", kv_lease_s=30.0)
    model.add_request("a", 0, 1000, 1, hold_kv=True)
    duration = model.step(now_s=100.0).duration_s
    assert model.next_event_s() == pytest.approx(100.0 + duration + 30.0)
    model.advance(100.0 + duration + 29.0)
    assert model.rank_stats()[0].held == 1
    model.advance(100.0 + duration + 30.0)
    assert model.rank_stats()[0].held == 0
    assert model.rank_stats()[0].kv_used_tokens == 0


def test_held_kv_freed_on_abort() -> None:
    model = make_model("prefill")
    model.add_request("a", 0, 1000, 1, hold_kv=True)
    model.step()
    assert model.abort("a")
    assert model.rank_stats()[0].kv_used_tokens == 0
    assert not model.abort("a")


def test_decode_request_reserves_transfers_then_decodes() -> None:
    model = make_model("decode")
    model.add_request("d", 1, 4096, 3, max_new_tokens=3, remote_prefill=True)
    assert not model.has_work()
    stats = model.rank_stats()[1]
    assert (stats.prealloc, stats.transfer, stats.kv_used_tokens) == (1, 0, 0)
    assert model.advance(0.0) == []  # reserved; the prefill side has no KV yet
    stats = model.rank_stats()[1]
    assert (stats.prealloc, stats.transfer, stats.transfer_kv_tokens, stats.kv_used_tokens) == (0, 1, 4096, 4096)
    assert model.next_event_s() is None
    assert model.kv_ready("d", 1.0)
    end = 1.0 + DEFAULT.kv_transfer_s(4096)
    assert model.next_event_s() == pytest.approx(end)
    assert model.advance(end - 1e-6) == []
    first = model.advance(end)
    assert [(t.request_id, t.index, t.finished) for t in first] == [("d", 0, False)]  # SGLang: the prefill's token
    assert model.rank_stats()[1].running == 1
    tokens = [t for _ in range(2) for t in model.step().tokens]
    assert [(t.index, t.finished) for t in tokens] == [(1, False), (2, True)]
    result = model.step()
    assert result.duration_s == 0.0
    assert model.rank_stats()[1].kv_used_tokens == 0


def test_decode_step_has_no_prefill_compute() -> None:
    model = make_model("decode", dp_size=1)
    model.add_request("d", 0, 8000, 5, remote_prefill=True)
    model.kv_ready("d", 0.0)
    model.advance(0.0)  # reserved at 0.0: the transfer starts
    model.advance(1.0)
    result = model.step()
    assert result.prefill_tokens_per_rank == [0]
    assert result.duration_s == pytest.approx(DEFAULT.alltoall_s + DEFAULT.decode_s(1, 8001))


def test_vllm_decode_computes_its_first_token() -> None:
    model = make_model("decode", dp_size=1, pd_connector="vllm", kv_block_size=16)
    model.add_request("d", 0, 100, 2, remote_prefill=True)
    model.kv_ready("d", 0.0)
    assert model.advance(0.0) == []
    assert model.advance(1.0) == []
    assert [(t.index, t.finished) for t in model.step().tokens] == [(0, False)]
    assert [(t.index, t.finished) for t in model.step().tokens] == [(1, True)]


def test_sglang_prealloc_reserves_output_and_blocks_the_queue() -> None:
    # capacity 10,000; R = 512: a 4,000-token prompt with max_new 4,000 needs 8,000 of 10,000 - 512 x active
    model = make_model("decode", dp_size=1, kv_capacity_tokens=10_000)
    model.add_request("a", 0, 4000, 10, max_new_tokens=4000, remote_prefill=True)
    model.add_request("b", 0, 1000, 10, max_new_tokens=100, remote_prefill=True)
    model.advance(0.0)
    stats = model.rank_stats()[0]
    # a is reserved; b (head of the queue now) needs max(1000 + 512, 1100) of 10,000 - 4,000 - 512 x 1: fits
    assert (stats.prealloc, stats.transfer) == (0, 2)
    model.add_request("c", 0, 3000, 10, max_new_tokens=3000, remote_prefill=True)
    model.advance(0.0)
    # c needs 6,000 of 10,000 - 5,000 - 512 x 2: it waits
    assert model.rank_stats()[0].prealloc == 1
    model.abort("a")
    model.advance(0.0)
    assert model.rank_stats()[0].prealloc == 0


def test_prealloc_respects_running_slots() -> None:
    model = make_model("decode", dp_size=1, max_running_requests=1)
    model.add_request("a", 0, 10, 5, remote_prefill=True)
    model.add_request("b", 0, 10, 5, remote_prefill=True)
    model.advance(0.0)
    assert (model.rank_stats()[0].transfer, model.rank_stats()[0].prealloc) == (1, 1)


def test_aborted_transfer_frees_its_reservation() -> None:
    model = make_model("decode", dp_size=1)
    model.add_request("a", 0, 500, 5, remote_prefill=True)
    model.advance(0.0)
    assert model.rank_stats()[0].kv_used_tokens == 500
    assert model.abort("a")
    stats = model.rank_stats()[0]
    assert (stats.transfer, stats.kv_used_tokens) == (0, 0)
    assert not model.kv_ready("a", 0.0)


def test_recompute_prefills_locally() -> None:
    model = make_model("decode", dp_size=1, pd_connector="vllm")
    model.add_request("a", 0, 500, 2, remote_prefill=True)
    model.advance(0.0)
    assert model.recompute("a")
    assert model.rank_stats()[0].kv_used_tokens == 0
    result = model.step()
    assert result.prefill_tokens_per_rank == [500]
    assert not model.recompute("a")


def test_sglang_prealloc_counts_running_requests_as_retractable() -> None:
    # SGLang 0.5.23 _required_admission_tokens / _allocatable_token_budgets with one running request of 1,000 + 1
    model = make_model("decode", dp_size=1, kv_capacity_tokens=10_000)
    model.add_request("run", 0, 1000, 50, max_new_tokens=3000, remote_prefill=True)
    model.kv_ready("run", 0.0)
    model.advance(0.0)
    model.advance(1.0)  # running, 1,001 tokens of KV (the prefill's token came with it)
    assert model.rank_stats()[0].running == 1
    # new: prompt 5,000, max_new 3,000. required = max(5,000 + 512, 5,000 + 3,000 - 1,001) = 7,999;
    # allocatable = 10,000 - 1,001 - max(512 x 1, 3,000 + 1,000 - 1,001) = 6,000: it waits
    model.add_request("new", 0, 5000, 10, max_new_tokens=3000, remote_prefill=True)
    model.advance(1.0)
    assert model.rank_stats()[0].prealloc == 1
    # with max_new 1,000: required = max(5,512, 6,000 - 1,001) = 5,512; allocatable = 10,000 - 1,001 - 2,999 = 6,000
    model.abort("new")
    model.add_request("small", 0, 5000, 10, max_new_tokens=1000, remote_prefill=True)
    model.advance(1.0)
    assert (model.rank_stats()[0].prealloc, model.rank_stats()[0].transfer) == (0, 1)
