"""Decode-aware choice: two objectives, IQR outliers, lexicographic order; alone and inside the allocators."""

from __future__ import annotations

import math

import pytest

from gateway.scheduling.allocation import water_fill
from gateway.scheduling.decode import DecodeLoad, DecodeRanker, iqr_outliers, lexicographic_key, upper_fence
from gateway.scheduling.phase import phase_fill
from gateway.scheduling.step_clock import StepClock
from gateway.types import RankKey
from tests.helpers import rank, req


@pytest.mark.parametrize(
    ("values", "k", "fence"),
    [
        # inclusive quartiles of 1..8: Q1 = 2.75, Q3 = 6.25
        ([1, 2, 3, 4, 5, 6, 7, 8], 1.5, 6.25 + 1.5 * 3.5),
        ([10, 10, 10, 10, 10, 30], 1.5, 10.0),  # no spread: Tukey calls anything above the common value out
        ([1, 2, 3, 4], 0.0, 3.25),
        ([5, 100, 7], 1.5, math.inf),  # too few ranks for quartiles
    ],
)
def test_upper_fence(values, k, fence):
    assert upper_fence(values, k) == pytest.approx(fence)


def test_negative_fence_multiplier_is_refused():
    with pytest.raises(ValueError, match="must be >= 0"):
        upper_fence([1, 2, 3, 4], -1)
    with pytest.raises(ValueError, match="iqr_k"):
        DecodeRanker([rank("e", 0)], iqr_k=-0.5)
    with pytest.raises(ValueError, match="bucket"):
        DecodeRanker([rank("e", 0)], bucket=0)


def test_spread_floor_keeps_one_bucket_above_the_peers_in():
    assert upper_fence([10, 10, 10, 10, 10, 30], 1.5, min_spread=4) == 16.0
    even = {RankKey("e", i): DecodeLoad(10, 10_000) for i in range(5)}
    even[RankKey("e", 0)] = DecodeLoad(12, 12_000)  # two requests more than its peers
    assert iqr_outliers(even, bucket=4) == frozenset()
    assert iqr_outliers(even, bucket=1) == keys(0)


def keys(*indices: int) -> frozenset[RankKey]:
    return frozenset(RankKey("e", i) for i in indices)


@pytest.mark.parametrize(
    ("loads", "outliers"),
    [
        # rank 3 holds far more requests than its peers
        ([(10, 1000), (11, 1000), (12, 1000), (40, 1000), (10, 1000), (11, 1000)], keys(3)),
        # rank 1 holds few requests but huge contexts: an outlier on the second objective alone
        ([(10, 1000), (10, 90_000), (12, 1100), (11, 1000), (10, 900), (12, 1000)], keys(1)),
        # evenly spread: nobody
        ([(10, 1000), (12, 1200), (14, 1400), (16, 1600)], keys()),
    ],
)
def test_iqr_outliers_on_either_objective(loads, outliers):
    group = {RankKey("e", i): DecodeLoad(requests, kv) for i, (requests, kv) in enumerate(loads)}
    assert iqr_outliers(group) == outliers


def test_lexicographic_key_buckets_requests_then_orders_by_kv():
    light_kv = DecodeLoad(requests=7, kv_tokens=1_000)
    heavy_kv = DecodeLoad(requests=4, kv_tokens=50_000)
    fewer_requests = DecodeLoad(requests=3, kv_tokens=90_000)
    ordered = sorted([heavy_kv, fewer_requests, light_kv], key=lambda v: lexicographic_key(v, bucket=4))
    # 7 and 4 requests share bucket 1, where KV decides; 3 requests is bucket 0 and wins on the first objective
    assert ordered == [fewer_requests, light_kv, heavy_kv]
    assert lexicographic_key(light_kv, bucket=1) > lexicographic_key(heavy_kv, bucket=1)


def test_ranker_ranks_outliers_last_and_counts_placements():
    ranks = [rank("e", i, running=10, kv_tokens=1000) for i in range(5)] + [rank("e", 5, running=40)]
    ranker = DecodeRanker(ranks)
    assert ranker.outliers("e") == keys(5)
    # rank 5 holds no KV at all, yet its 40 requests make it an outlier: it comes after every other rank
    assert min(ranks, key=lambda r: ranker.key(r.key)).key == RankKey("e", 0)
    assert ranker.key(RankKey("e", 5)) == (1, 10, 0.0)
    ranker.place(RankKey("e", 0), 50)
    assert ranker.loads[RankKey("e", 0)] == DecodeLoad(11, 1050)
    assert ranker.key(RankKey("e", 0)) == (0, 2, 1050)
    ranker.place(RankKey("e", 0), 1000)  # now 2,050 KV tokens against its peers' 1,000: beyond the fence
    assert ranker.key(RankKey("e", 0)) == (1, 3, 2050)
    assert DecodeRanker(ranks, iqr_k=None).outliers("e") == frozenset()


def test_water_fill_with_decode_aware_choice_avoids_the_outlier_and_prefers_less_kv():
    # all ranks idle for prefill (equal level): decode objectives decide
    ranks = [
        rank("e", 0, running=40, kv_tokens=1000),  # outlier on requests
        rank("e", 1, running=9, kv_tokens=80_000),
        rank("e", 2, running=10, kv_tokens=2_000),
        rank("e", 3, running=11, kv_tokens=3_000),
        rank("e", 4, running=10, kv_tokens=2_500),
    ]
    plain = water_fill([req("r", 100)], ranks, now=0, max_wait_s=10)
    assert [str(k) for _, k in plain.assigned] == ["e/1"]  # fewest running requests
    aware = water_fill([req("r", 100)], ranks, now=0, max_wait_s=10, decode=DecodeRanker(ranks))
    # rank 1 is a KV outlier; among 2, 3, 4 (one bucket of requests) the least KV wins
    assert [str(k) for _, k in aware.assigned] == ["e/2"]


def test_phase_fill_with_decode_aware_choice_spreads_a_batch_by_decode_load():
    clock = StepClock(0.05, initial_per_token_s=1e-4)
    # rank 3's queued prompt sets the next step's length; short requests elsewhere do not lengthen it
    ranks = [rank("e", i, running=10, kv_tokens=10_000 * (i + 1), queued=5000 if i == 3 else 0) for i in range(4)]
    batch = [req(f"r{i}", 100) for i in range(4)]
    aware = phase_fill(batch, ranks, clock, {}, now=0, max_wait_s=10, queue_steps=2, decode=DecodeRanker(ranks))
    # equal predicted first-token times: least KV first, until rank 0's requests reach the next bucket (12)
    assert [str(k) for _, k in aware.assigned] == ["e/0", "e/0", "e/1", "e/1"]
    # without it, the next-step prefill level goes first: one per empty rank, then the lightest again
    plain = phase_fill(batch, ranks, clock, {}, now=0, max_wait_s=10, queue_steps=2)
    assert [str(k) for _, k in plain.assigned] == ["e/0", "e/1", "e/2", "e/0"]
