"""The analytic load of a trace on a simulated cluster (gateway.sim.capacity): what the definition promises."""

from __future__ import annotations

import random
import statistics
from dataclasses import replace

import pytest

from gateway.sim.calibration import EngineModelConfig
from gateway.sim.capacity import cluster_load, lockstep_excess_s, needed_engine_time, peak_load
from gateway.sim.engine_model import EngineModel
from gateway.sim.simulate import SimConfig, simulate
from gateway.workload.traces import TraceRequest, rescale

ENGINE = EngineModelConfig()


def mixed_trace(n: int = 300, seed: int = 2, long_fraction: float = 0.05) -> list[TraceRequest]:
    """Poisson arrivals at 1 req/s of short prompts and a fraction of long ones (with costly late chunks)."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(1.0)
        prompt = rng.choice([300, 1500, 4000]) if rng.random() >= long_fraction else rng.randint(20_000, 40_000)
        out.append(TraceRequest(t, prompt, rng.randint(1, 300)))
    return out


def test_load_scales_exactly_with_the_rate_and_capacity_does_not_move():
    trace = mixed_trace()
    base = cluster_load(trace, ENGINE, 2, 4)
    for scale in (0.5, 2.0, 7.5):
        scaled = cluster_load(rescale(trace, scale), ENGINE, 2, 4)
        assert scaled.load == pytest.approx(scale * base.load)
        assert scaled.capacity_rps == pytest.approx(base.capacity_rps)
    assert cluster_load(rescale(trace, base.rate_scale_for(0.8)), ENGINE, 2, 4).load == pytest.approx(0.8)
    assert cluster_load(trace, ENGINE, 4, 4).load == pytest.approx(base.load / 2)  # twice the ranks


def test_prefill_capacity_matches_the_calibration_point():
    """DeepSeek's 7.8k prompt tokens/s per H800 at 16k tokens per step of 4k prompts (calibration.py)."""
    engine = replace(ENGINE, max_prefill_tokens_per_step=16_384)
    trace = [TraceRequest(i * 0.01, 4096, 1) for i in range(400)]
    capacity = cluster_load(trace, engine, 1, 1)
    assert capacity.needed.bound == "prefill"
    assert capacity.needed.lockstep_excess_s == 0.0
    assert capacity.capacity_prompt_tok_s == pytest.approx(7.7e3, rel=0.01)


def test_decode_capacity_matches_the_calibration_point():
    """About 55 ms a step at 128 running requests per rank with 4k context (calibration.py): a decode-only load
    held at 128 running requests needs 128 tokens per 55 ms."""
    engine = replace(ENGINE, max_running_requests=128, max_prefill_tokens_per_step=1 << 20, prefill_token_s=0.0)
    engine = replace(engine, prefill_attn_s=0.0, kv_capacity_tokens=10_000_000)  # only the slots bind
    n = 2000  # long outputs: the prefill step and the growth of the context are small next to 2000 decode steps
    trace = [TraceRequest(i * 0.01, 4096 - n // 2, n) for i in range(128)]
    capacity = cluster_load(trace, engine, 1, 1)
    assert capacity.needed.bound == "slots"
    step_s = capacity.needed.total_s / capacity.needed.steps
    assert step_s == pytest.approx(0.055, rel=0.02)


@pytest.mark.parametrize(("prompt", "output"), [(100, 1), (9000, 5), (30_000, 40)])
def test_request_work_is_what_the_engine_model_spends(prompt, output):
    """Prefill and decode work are fixed by the request (chunking does not change them), and a chunk's excess
    over a fresh full chunk is what the engine model's own steps show."""
    model = EngineModel(ENGINE, dp_size=1)
    model.add_request("r", 0, prompt, output)
    steps = []
    while model.has_work():
        steps.append(model.step())
    needed = needed_engine_time([TraceRequest(0.0, prompt, output)], ENGINE, dp_size=1)
    spent = sum(s.work_s_per_rank[0] for s in steps)
    assert spent == pytest.approx(needed.prefill_work_s + needed.decode_work_s)
    fresh = ENGINE.prefill_chunk_s(ENGINE.max_prefill_tokens_per_step, 0)
    decode = [s for s in steps if not s.prefill_tokens_per_rank[0]]
    chunk_costs = [s.work_s_per_rank[0] for s in steps if s.prefill_tokens_per_rank[0]]
    assert len(steps) == -(-prompt // ENGINE.max_prefill_tokens_per_step) + output - 1
    assert lockstep_excess_s(prompt, ENGINE) == pytest.approx(sum(max(0.0, c - fresh) for c in chunk_costs))
    assert len(decode) == output - 1


def test_peak_load_of_a_steady_trace_is_near_its_average():
    trace = [TraceRequest(i * 0.5, 2000, 100) for i in range(1200)]
    average = cluster_load(trace, ENGINE, 2, 4).load
    assert peak_load(trace, ENGINE, 2, 4) == pytest.approx(average, rel=0.02)


def _queueing_by_third(trace: list[TraceRequest], load: float) -> list[float]:
    """Mean TTFT beyond each request's unloaded TTFT, seconds, for each third of the requests by arrival."""
    scale = cluster_load(trace, ENGINE, 1, 4).rate_scale_for(load)
    records = simulate(rescale(trace, scale), SimConfig(policy="sbs", instances=1, dp_size=4)).records
    third = len(records) // 3
    return [
        statistics.fmean(r.ttft_s - r.unloaded_ttft_s for r in records[i * third : (i + 1) * third]) for i in range(3)
    ]


def test_below_capacity_sbs_keeps_up_and_above_it_falls_behind():
    """The definition's promise, simulated (600 Poisson arrivals, 1 x 4 ranks): at 80% the queueing delay of the
    last third of the requests is about the first third's; at 130% the backlog grows and the delay with it."""
    trace = mixed_trace(600, long_fraction=0.0)
    below, above = _queueing_by_third(trace, 0.8), _queueing_by_third(trace, 1.3)
    assert below[2] < 1.5 * below[0]
    assert above[2] > 2 * above[0]


def test_long_prompts_lockstep_excess_keeps_the_load_meaningful():
    """With 2% of prompts at 20k-40k tokens (a quarter of the needed time is lockstep excess) the same holds in
    kind: at 80% the delay stays a fraction of what it reaches at 130%, where it keeps growing."""
    trace = mixed_trace(600, long_fraction=0.02)
    assert cluster_load(trace, ENGINE, 1, 4).needed.lockstep_excess_s > 0
    below, above = _queueing_by_third(trace, 0.8), _queueing_by_third(trace, 1.3)
    assert above[2] > 5 * above[0]
    assert below[2] < 0.3 * above[2]
