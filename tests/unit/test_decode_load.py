"""The P/D load the engines report (SGLang's decode and prefill queues in ``/metrics`` and ``GET /v1/loads``, vLLM's
KV fetch stages), reconciled with the gateway's own decode legs in the load view, and counted by the decode
allocation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gateway.config import DecodeConfig
from gateway.engines.sglang import SglangAdapter
from gateway.engines.vllm import VllmAdapter
from gateway.load.view import DECODE_ROLES, EngineSpec, LoadView
from gateway.scheduling.pd import DecodeAllocation
from gateway.types import RankKey, RankLoad, RankMetrics
from tests.helpers import MODEL, req

FIXTURES = Path(__file__).parent / "fixtures" / "metrics"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


SGLANG_DECODE_METRICS = fixture("sglang-0.5.23_pd-decode_dp2.prom")

SGLANG_PREFILL_METRICS = fixture("sglang-0.5.23_pd-prefill.prom")


def sglang_load(rank: int, mode: str, **core: Any) -> dict[str, Any]:
    """One ``loads`` entry as SGLang 0.5.23 sends it (``LoadSnapshot.to_dict`` with ``include=core,disagg``: every
    scalar field of the snapshot, then the ``disaggregation`` section), with ``core`` and ``disagg_*`` overriding."""
    disagg = {k.removeprefix("disagg_"): core.pop(k) for k in list(core) if k.startswith("disagg_")}
    load = {
        "timestamp": 1796000000.25,
        "dp_rank": rank,
        "num_running_reqs": 0,
        "num_waiting_reqs": 0,
        "num_waiting_uncached_tokens": 0,
        "num_used_tokens": 0,
        "num_total_tokens": 0,
        "num_active_tokens": 0,
        "num_prealloc_ready_tokens": 0,
        "max_total_num_tokens": 400_000,
        "max_running_requests": 256,
        "token_usage": 0.0,
        "gen_throughput": 0.0,
        "cache_hit_rate": 0.0,
        "utilization": 0.0,
        "total_prefill_uncached_tokens": 0,
        "total_prefill_busy_us": 0,
        "decode_moments": None,
        **core,
        "disaggregation": {
            "mode": mode,
            "prefill_bootstrap_queue_reqs": 0,
            "prefill_inflight_queue_reqs": 0,
            "decode_prealloc_queue_reqs": 0,
            "decode_transfer_queue_reqs": 0,
            "decode_retracted_queue_reqs": 0,
            "kv_transfer_speed_gb_s": 0.0,
            "kv_transfer_latency_ms": 0.0,
            **disagg,
        },
    }
    return load


def loads_body(*loads: dict[str, Any]) -> str:
    """A ``GET /v1/loads`` body (``entrypoints/v1_loads.py``, 0.5.23)."""
    return json.dumps(
        {
            "timestamp": "2026-12-07T06:00:00+00:00",
            "version": "0.5.23",
            "accelerator": "NVIDIA H800",
            "num_accelerators": 1,
            "loads": list(loads),
        }
    )


# -- parsing -----------------------------------------------------------------------------------------------------


def test_sglang_metrics_count_the_decode_queues_as_running_and_keep_them_apart() -> None:
    ranks = SglangAdapter().parse_metrics(SGLANG_DECODE_METRICS)
    assert ranks[0] == RankMetrics(
        running=10, waiting=1, decode_prealloc=2, decode_transfer=3, prefill_bootstrap=0
    )  # the priority="1" breakdown is not the total
    assert (ranks[1].running, ranks[1].decode_prealloc, ranks[1].decode_transfer) == (5, 0, 4)


def test_sglang_metrics_count_the_bootstrap_queue_as_waiting() -> None:
    [(rank, metrics)] = SglangAdapter().parse_metrics(SGLANG_PREFILL_METRICS).items()
    assert rank == 0 and metrics == RankMetrics(waiting=5, prefill_bootstrap=3, prefill_inflight=6)


def test_sglang_loads_give_a_decode_ranks_whole_load() -> None:
    body = loads_body(
        # 4 running; waiting 9 = 1 transferred + 3 pre-allocating + 4 in transfer + 1 retracted
        sglang_load(
            0,
            "decode",
            num_running_reqs=4,
            num_waiting_reqs=9,
            num_used_tokens=30_000,
            num_total_tokens=42_000,
            num_active_tokens=14_000,
            disagg_decode_prealloc_queue_reqs=3,
            disagg_decode_transfer_queue_reqs=4,
            disagg_decode_retracted_queue_reqs=1,
        ),
        sglang_load(1, "decode"),
    )
    loads = SglangAdapter().parse_loads(body)
    assert loads[0] == {
        "queued_prefill_tokens": 0.0,
        "running": 12.0,
        "waiting": 1.0,
        "decode_prealloc": 3.0,
        "decode_transfer": 4.0,
        "decode_retracted": 1.0,
        "prefill_bootstrap": 0.0,
        "prefill_inflight": 0.0,
        "kv_tokens": 42_000.0,
    }
    assert loads[1]["running"] == 0.0 and loads[1]["kv_tokens"] == 0.0


def test_sglang_loads_of_a_prefill_rank_count_its_bootstrap_queue_as_waiting() -> None:
    body = loads_body(
        sglang_load(
            0,
            "prefill",
            num_running_reqs=1,
            num_waiting_reqs=5,
            num_waiting_uncached_tokens=7000,
            num_total_tokens=9000,
            disagg_prefill_bootstrap_queue_reqs=2,
            disagg_prefill_inflight_queue_reqs=6,
        )
    )
    [fields] = SglangAdapter().parse_loads(body).values()
    assert (fields["running"], fields["waiting"], fields["queued_prefill_tokens"]) == (1.0, 5.0, 7000.0)
    assert (fields["prefill_bootstrap"], fields["prefill_inflight"]) == (2.0, 6.0)
    assert "kv_tokens" not in fields  # a prefill rank's KV stays local accounting


def test_sglang_loads_of_a_mixed_rank_or_an_unreadable_pd_entry_give_only_queued_tokens() -> None:
    mixed = sglang_load(0, "null", num_running_reqs=3, num_waiting_uncached_tokens=512)
    broken = sglang_load(1, "decode", num_running_reqs="3", num_waiting_uncached_tokens=5)
    core_only = {"dp_rank": 2, "num_running_reqs": 1, "num_waiting_reqs": 0, "num_waiting_uncached_tokens": 8}
    loads = SglangAdapter().parse_loads(loads_body(mixed, broken, core_only))
    assert loads == {
        0: {"queued_prefill_tokens": 512.0},
        1: {"queued_prefill_tokens": 5.0},
        2: {"queued_prefill_tokens": 8.0},
    }


VLLM_CONSUMER_METRICS = fixture("vllm-0.34_kv-consumer_dp2.prom")


def test_vllm_fetch_stages_move_from_waiting_to_running() -> None:
    ranks = VllmAdapter().parse_metrics(VLLM_CONSUMER_METRICS)
    assert ranks[0] == RankMetrics(running=11, waiting=2, decode_prealloc=2, decode_transfer=3)
    assert ranks[1] == RankMetrics(running=2, waiting=0, decode_prealloc=0, decode_transfer=0)


def test_vllm_without_the_stages_is_read_as_before() -> None:
    text = VLLM_CONSUMER_METRICS.split("# HELP vllm:num_requests_kv_fetch_by_stage")[0]  # a KV producer's
    assert VllmAdapter().parse_metrics(text)[0] == RankMetrics(running=6, waiting=7)


# -- the load view -------------------------------------------------------------------------------------------------


def decode_view(dp_size: int = 2) -> LoadView:
    return LoadView([EngineSpec("d", dp_size, frozenset({MODEL}), 8192, "decode")], stale_after_s=3.0)


def decode_loads(view: LoadView, now: float) -> dict[int, RankLoad]:
    return {load.key.rank: load for load in view.snapshot(now, DECODE_ROLES)}


def test_a_leg_the_engine_reports_is_not_counted_again() -> None:
    view = decode_view()
    d0 = RankKey("d", 0)
    view.on_dispatch_decode("a", d0, 1000, 0.0)
    view.on_dispatch_decode("b", d0, 2000, 0.0)
    # asked for at 0.5, arrived at 0.6: the engine has both legs in its queues, and 3 requests of others running
    figures = RankMetrics(running=5, decode_prealloc=1, decode_transfer=1, kv_tokens=9000, queued_read_at=0.5)
    view.on_dispatch_decode("c", d0, 500, 0.55)  # sent after the figures were read: not in them
    view.on_scrape("d", {0: figures, 1: RankMetrics()}, 0.6)
    load = decode_loads(view, 0.6)[0]
    assert load.running == 6  # 5 reported + c
    assert (load.decode_prealloc, load.decode_transfer) == (2, 1)  # c arrives in the pre-allocation queue
    assert load.kv_tokens == 9500
    view.on_dispatch_decode("d", d0, 700, 0.7)
    view.on_tokens("a", 10)
    assert (decode_loads(view, 0.7)[0].running, decode_loads(view, 0.7)[0].kv_tokens) == (7, 10_210)
    view.on_finish("a", 0.8)  # reported at the scrape: leaves the engine's figure
    view.on_finish("c", 0.8)  # sent since: leaves the gateway's tally
    load = decode_loads(view, 0.8)[0]
    assert load.running == 5 and load.decode_prealloc == 2  # d is still on its way
    assert load.kv_tokens == 9000 - 1000 + 700  # a's figure at the scrape and its tokens since leave; c's too
    assert decode_loads(view, 0.8)[1].running == 0


def test_the_gateways_own_legs_floor_a_lagging_figure_and_a_stale_one_is_ignored() -> None:
    view = decode_view(1)
    d0 = RankKey("d", 0)
    for i in range(4):
        view.on_dispatch_decode(str(i), d0, 1000, 0.0)
    view.on_scrape("d", {0: RankMetrics(running=1, decode_prealloc=1, kv_tokens=800, queued_read_at=0.1)}, 0.2)
    load = decode_loads(view, 0.2)[0]
    assert (load.running, load.kv_tokens) == (4, 4000)  # the engine has not seen them all yet
    later = decode_loads(view, 4.0)[0]  # the scrape is stale
    assert (later.running, later.kv_tokens, later.decode_prealloc, later.decode_transfer) == (4, 4000, 0, 0)


def test_kv_figures_of_a_rank_that_is_not_decode_are_not_used() -> None:
    view = LoadView([EngineSpec("p", 1, frozenset({MODEL}), 8192, "prefill")], stale_after_s=3.0)
    view.on_scrape("p", {0: RankMetrics(kv_tokens=50_000)}, 0.0)
    assert view.snapshot(0.0)[0].kv_tokens == 0


# -- the decode allocation -----------------------------------------------------------------------------------------


def test_the_decode_allocation_counts_the_queues() -> None:
    view = decode_view()
    # rank 0 runs 2 requests and has 6 waiting for or receiving their KV; rank 1 runs 4
    view.on_scrape(
        "d",
        {0: RankMetrics(running=8, decode_prealloc=4, decode_transfer=2), 1: RankMetrics(running=4)},
        0.0,
    )
    for settings in (None, DecodeConfig()):
        ranks = view.snapshot(0.1, DECODE_ROLES)
        assert DecodeAllocation(settings).choose(req("x", 100), ranks) == RankKey("d", 1)


def test_the_decode_allocation_counts_the_kv_reserved_for_transfers() -> None:
    view = decode_view()
    # the same requests on both ranks; rank 1 has reserved 60k tokens for requests in transfer
    view.on_scrape(
        "d",
        {0: RankMetrics(running=2, kv_tokens=4000), 1: RankMetrics(running=2, decode_transfer=2, kv_tokens=64_000)},
        0.0,
    )
    for settings in (None, DecodeConfig()):
        assert DecodeAllocation(settings).choose(req("x", 100), view.snapshot(0.1, DECODE_ROLES)) == RankKey("d", 0)
