"""The engine model's prefix cache per DP rank (``EngineModelConfig.enable_prefix_caching``): cached prompt blocks cost
no prefill on the same rank only, idle blocks are evicted least recently used first (a prompt's tail first) when the
rank's KV is needed, blocks held by running requests are never evicted, and the hit counters the engines export."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.sim.calibration import EngineModelConfig
from gateway.sim.engine_model import EngineModel, RankStats
from gateway.sim.mock_engine.metrics import MockEngineMetrics
from gateway.sim.simulate import SimConfig, simulate
from gateway.workload.traces import TraceRequest

CACHED = replace(EngineModelConfig(), enable_prefix_caching=True)
FLAVOURS: dict[str, dict[str, Any]] = {
    "idealised": {},
    "sglang": {"step_composition": "sglang", "admission": "sglang"},
    "vllm": {"step_composition": "vllm", "admission": "vllm", "kv_block_size": 16},
}


def model(flavour: str = "idealised", dp_size: int = 1, **overrides: Any) -> EngineModel:
    return EngineModel(replace(CACHED, **FLAVOURS[flavour], **overrides), dp_size)


def prefilled(m: EngineModel, rank: int = 0) -> int:
    """Run ``m`` until it is idle; the prompt tokens ``rank`` prefilled meanwhile."""
    total = 0
    for _ in range(10_000):
        if not m.has_work():
            return total
        total += m.step().prefill_tokens_per_rank[rank]
    raise AssertionError("the model did not become idle")


@pytest.mark.parametrize("flavour", list(FLAVOURS))
@pytest.mark.parametrize(
    ("first", "second", "prompt", "expected"),
    [
        ((1, 2, 3), (1, 2, 9), 1124, 100),  # two shared 512-token blocks
        ((1, 2, 3), (1, 8, 9), 1124, 612),  # one
        ((1, 2, 3), (7, 2, 3), 1124, 1124),  # ids are chained: a different head shares nothing
        ((1, 2, 3), (1, 2, 3), 1124, {"vllm": 4}),  # a partial last block is cached in whole KV blocks (vLLM: 96 of
        # its 100 tokens; a 1-token page: all of them, but the last token is recomputed, so the block is not hit)...
        ((1, 2), (1, 2), 1024, 512),  # ...so a whole-prompt match drops its last block
        ((), (), 1124, 1124),  # no block ids (an Azure trace): nothing shared
    ],
)
def test_a_second_request_on_the_same_rank_prefills_only_what_is_not_cached(
    flavour: str, first: tuple[int, ...], second: tuple[int, ...], prompt: int, expected: int | dict[str, int]
) -> None:
    if isinstance(expected, dict):
        expected = expected.get(flavour, 100)
    m = model(flavour)
    m.add_request("a", 0, prompt, 3, prefix_blocks=first)
    assert prefilled(m) == prompt
    m.add_request("b", 0, prompt, 3, prefix_blocks=second)
    assert prefilled(m) == expected
    stats = m.rank_stats()[0]
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (2 * prompt, prompt - expected)


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_another_rank_has_its_own_cache(flavour: str) -> None:
    m = model(flavour, dp_size=2)
    m.add_request("a", 0, 1124, 3, prefix_blocks=(1, 2, 3))
    prefilled(m)
    m.add_request("b", 1, 1124, 3, prefix_blocks=(1, 2, 9))
    assert prefilled(m, rank=1) == 1124
    m.add_request("c", 0, 1124, 3, prefix_blocks=(1, 2, 9))
    assert prefilled(m, rank=0) == 100


def test_the_prefix_cache_is_off_in_the_idealised_profile() -> None:
    m = EngineModel(EngineModelConfig(), 1)
    m.add_request("a", 0, 1124, 3, prefix_blocks=(1, 2, 3))
    prefilled(m)
    m.add_request("b", 0, 1124, 3, prefix_blocks=(1, 2, 3))
    assert prefilled(m) == 1124
    assert m.rank_stats()[0].prefix_cache_queries == 0


def test_a_block_computed_in_a_step_is_hit_from_the_next_step_on() -> None:
    m = model()
    m.add_request("a", 0, 1124, 3, prefix_blocks=(1, 2, 3))
    m.add_request("b", 0, 1124, 3, prefix_blocks=(1, 2, 9))  # same step: both compute blocks 1 and 2
    assert prefilled(m) == 2 * 1124


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_idle_blocks_are_evicted_least_recently_used_first_and_a_prompts_tail_first(flavour: str) -> None:
    # 2,112 KV tokens: A's and C's prompts (1,034 each) fit idle together; D's 500 tokens then push out 522 of them
    m = model(flavour, kv_capacity_tokens=2112)
    for request_id, blocks in (("a", (1, 2, 3)), ("c", (4, 5, 6))):
        m.add_request(request_id, 0, 1034, 1, prefix_blocks=blocks, max_new_tokens=1)
        prefilled(m)
    m.add_request("d", 0, 500, 1, prefix_blocks=(7,), max_new_tokens=1)
    prefilled(m)
    m.add_request("f", 0, 1034, 1, prefix_blocks=(4, 5, 6), max_new_tokens=1)  # C, more recent than A: kept
    assert prefilled(m) == 10
    m.add_request("e", 0, 1034, 1, prefix_blocks=(1, 2, 3), max_new_tokens=1)  # A: its tail went, its head stayed
    assert prefilled(m) == 522


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_blocks_held_by_a_running_request_are_not_evicted(flavour: str) -> None:
    m = model(flavour, kv_capacity_tokens=3000)
    m.add_request("z", 0, 1024, 1, prefix_blocks=(10, 11), max_new_tokens=1)
    prefilled(m)  # Z's blocks are idle now
    m.add_request("a", 0, 1034, 400, prefix_blocks=(1, 2, 3), max_new_tokens=400)
    for _ in range(5):
        m.step()  # A prefilled and decodes, holding blocks 1-3
    m.add_request("b", 0, 1500, 1, prefix_blocks=(7, 8, 9), max_new_tokens=1)  # needs the KV Z's blocks hold
    total = 0
    while m.rank_stats()[0].waiting:
        total += m.step().prefill_tokens_per_rank[0]
    assert total == 1500
    m.add_request("c", 0, 1034, 1, prefix_blocks=(1, 2, 4), max_new_tokens=1)
    m.add_request("y", 0, 1034, 1, prefix_blocks=(10, 11, 12), max_new_tokens=1)
    assert m.rank_stats()[0].running == 1  # A still runs
    assert prefilled(m) == 10 + 1034  # C hits A's blocks; Z's were evicted
    assert m.rank_stats()[0].prefix_cache_hits == 1024


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_kv_counts_a_shared_block_once_and_idle_blocks_as_free(flavour: str) -> None:
    m = model(flavour)
    m.add_request("a", 0, 1024, 50, prefix_blocks=(1, 2), max_new_tokens=50)
    m.step()
    m.add_request("b", 0, 1100, 50, prefix_blocks=(1, 2, 3), max_new_tokens=50)
    m.step()
    m.step()
    stats = m.rank_stats()[0]
    assert stats.running == 2
    per_request = 1024 + 1100
    assert stats.kv_used_tokens < per_request  # blocks 1 and 2 are held by both, stored once
    prefilled(m)
    stats = m.rank_stats()[0]
    assert stats.kv_used_tokens == 0  # the cached blocks are idle: free for the engines' usage figures
    assert stats.prefix_cache_tokens == 1024 + 64 if flavour == "vllm" else 1100


def test_sglang_hit_rate_is_the_latest_prefill_steps() -> None:
    m = model("sglang")
    m.add_request("a", 0, 1124, 2, prefix_blocks=(1, 2, 3))
    prefilled(m)
    assert m.rank_stats()[0].cache_hit_rate == 0.0
    m.add_request("b", 0, 1124, 2, prefix_blocks=(1, 2, 9))
    m.step()
    assert m.rank_stats()[0].cache_hit_rate == pytest.approx(1024 / 1124)
    prefilled(m)  # decode steps leave the gauge as it was
    assert m.rank_stats()[0].cache_hit_rate == pytest.approx(1024 / 1124)


def test_a_preempted_request_hits_its_own_blocks_and_is_not_counted_again() -> None:
    m = model("vllm", kv_capacity_tokens=2400, max_prefill_tokens_per_step=4096)
    m.add_request("a", 0, 1100, 600, prefix_blocks=(1, 2, 3))
    m.add_request("b", 0, 1100, 600, prefix_blocks=(4, 5, 6))
    prefilled(m)
    stats = m.rank_stats()[0]
    assert stats.preemptions >= 1
    assert stats.prefix_cache_queries == 2200
    assert stats.prefix_cache_hits == 0


@pytest.mark.parametrize(
    ("flavor", "flags", "on"),
    [
        ("sglang", {}, True),
        ("sglang", {"disable_radix_cache": True}, False),
        ("vllm", {}, True),
        ("vllm", {"enable_prefix_caching": False}, False),
    ],
)
def test_as_shipped_profiles_cache_prefixes_unless_told_not_to(flavor: Any, flags: dict[str, Any], on: bool) -> None:
    assert EngineModelConfig.as_shipped(flavor, 8, **flags).enable_prefix_caching is on


@pytest.mark.parametrize(
    ("flavor", "flags"), [("sglang", {"enable_prefix_caching": False}), ("vllm", {"disable_radix_cache": True})]
)
def test_the_other_engines_cache_flag_is_refused(flavor: Any, flags: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="setting"):
        EngineModelConfig.as_shipped(flavor, 8, **flags)


def test_prefix_blocks_must_be_whole_kv_blocks() -> None:
    with pytest.raises(ValueError, match="prefix_block_tokens"):
        model("vllm").add_request("a", 0, 100, 1, prefix_blocks=(1,), prefix_block_tokens=40)


def rendered_samples(flavor: Any, stats: list[RankStats]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    metrics = MockEngineMetrics(flavor, "m", len(stats), lambda: stats)
    text = metrics.render().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def cache_stats(rank: int, queries: int, hits: int, rate: float) -> RankStats:
    return RankStats(rank, 0, 0, 0, 0, 100, 0.0, prefix_cache_queries=queries, prefix_cache_hits=hits,
                     cache_hit_rate=rate)  # fmt: skip


def test_vllm_exports_prefix_cache_queries_and_hits_per_engine() -> None:
    samples = rendered_samples("vllm", [cache_stats(0, 1000, 250, 0.5), cache_stats(1, 40, 0, 0.0)])
    for rank, queries, hits in ((0, 1000, 250), (1, 40, 0)):
        labels = frozenset({"model_name": "m", "engine": str(rank)}.items())
        assert samples["vllm:prefix_cache_queries_total", labels] == queries
        assert samples["vllm:prefix_cache_hits_total", labels] == hits


def test_sglang_exports_its_cache_hit_rate_and_effective_tokens_per_dp_rank() -> None:
    samples = rendered_samples("sglang", [cache_stats(0, 1000, 250, 0.5), cache_stats(1, 40, 0, 0.0)])
    for rank, rate, hits, uncached in ((0, 0.5, 250, 750), (1, 0.0, 0, 40)):
        base = {"model_name": "m", "engine_type": "unified", "tp_rank": "0", "pp_rank": "0"}
        labels = {**base, "moe_ep_rank": str(rank), "dp_rank": str(rank)}
        assert samples["sglang:cache_hit_rate", frozenset(labels.items())] == rate
        name = "sglang:prefill_effective_tokens_total"
        assert samples[name, frozenset({**labels, "mode": "device_hit"}.items())] == hits
        assert samples[name, frozenset({**labels, "mode": "input"}.items())] == uncached


def conversation_trace() -> list[TraceRequest]:
    """Ten conversations of three turns: each turn's prompt starts with the whole previous turn's blocks."""
    trace = []
    for turn in range(3):
        for conversation in range(10):
            blocks = tuple(1000 * conversation + b for b in range(2 * turn + 2))
            trace.append(TraceRequest(20.0 * turn + 0.1 * conversation, 512 * len(blocks), 20, blocks))
    return trace


@pytest.mark.parametrize("policy", ["cache_aware", "round_robin"])
def test_the_simulator_passes_the_traces_blocks_and_reports_the_hit_rate_only_with_a_cache(policy: Any) -> None:
    trace = conversation_trace()
    plain = simulate(trace, SimConfig(policy=policy, instances=1, dp_size=2)).summary()
    assert "prefix_cache_hit_rate" not in plain
    cached = simulate(trace, SimConfig(policy=policy, instances=1, dp_size=2, engine=CACHED)).summary()
    assert cached["completed"] == len(trace)
    assert 0.0 < cached["prefix_cache_hit_rate"] < 1.0
    assert cached == simulate(trace, SimConfig(policy=policy, instances=1, dp_size=2, engine=CACHED)).summary()
    if policy == "cache_aware":  # every later turn goes where its conversation is cached: all its old blocks hit
        reused = sum(512 * (2 * turn) for turn in (1, 2)) * 10
        assert cached["prefix_cache_hit_rate"] == pytest.approx(reused / sum(r.prompt_tokens for r in trace))


def test_block_ids_past_the_prompts_end_are_ignored() -> None:
    m = model()
    m.add_request("a", 0, 600, 1, prefix_blocks=(1, 2, 3, 4))  # 600 tokens: blocks 3 and 4 hold nothing
    prefilled(m)
    assert m.rank_stats()[0].prefix_cache_tokens == 600
    m.add_request("b", 0, 1200, 1, prefix_blocks=(1, 2, 3))
    assert prefilled(m) == 1200 - 600
