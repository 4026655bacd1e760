"""Virtual-time simulation of P/D pools: prefill and decode engine models with each protocol's handoff."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import pytest
from click.testing import CliRunner

from gateway.cli import main
from gateway.sim.calibration import EngineModelConfig
from gateway.sim.information import InformationLimits
from gateway.sim.pd_driver import PdPools
from gateway.sim.simulate import SimConfig, _Sim, simulate, unloaded_ttft_s
from gateway.types import RankKey
from gateway.workload.traces import TraceRequest
from tests.unit.test_simulate import synthetic_trace

CONNECTORS = ("sglang", "vllm")


def pd_config(connector: str = "sglang", policy: str = "sbs", **pools: object) -> SimConfig:
    sizes = {"prefill_instances": 2, "prefill_dp_size": 4, "decode_instances": 1, "decode_dp_size": 8} | pools
    return SimConfig(policy=policy, pd=PdPools(connector=connector, **sizes))  # type: ignore[arg-type]


def run(trace: list[TraceRequest], config: SimConfig) -> _Sim:
    sim = _Sim(trace, config)
    sim.run()
    return sim


@pytest.mark.parametrize("connector", CONNECTORS)
@pytest.mark.parametrize("policy", ["sbs", "cache_aware", "least_load", "round_robin"])
def test_every_request_completes_on_the_decode_pool_and_runs_are_deterministic(connector, policy):
    trace = synthetic_trace(n=300)
    config = pd_config(connector, policy)
    sim = run(trace, config)
    summary = simulate(trace, config).summary()
    assert summary["completed"] == len(trace) and summary["failed"] == 0
    assert summary == simulate(trace, config).summary()
    for name, engine in sim.engines.items():  # nothing left held, queued or running on either pool
        assert not engine.has_work() and engine.next_event_s() is None, name
        assert all(s.held == s.prealloc == s.transfer == 0 for s in engine.rank_stats()), name


@pytest.mark.parametrize("connector", CONNECTORS)
def test_an_unloaded_request_waits_its_prefill_and_its_kv_transfer(connector):
    engine = EngineModelConfig()
    prompt = 20_000
    sim = run([TraceRequest(0.0, prompt, 5)], replace(pd_config(connector, "round_robin"), engine=engine))
    ttft = sim.records[0].ttft_s
    floor = unloaded_ttft_s(prompt, engine) + engine.kv_transfer_s(prompt)
    assert ttft >= floor
    if connector == "sglang":  # the first output token comes with the KV
        assert ttft == pytest.approx(floor, rel=0.05)
    else:  # vLLM's decode rank computes the first output token in a step of its own
        assert ttft > floor
    assert sim.records[0].unloaded_ttft_s == pytest.approx(floor)


def test_a_slower_kv_transfer_delays_the_first_tokens():
    trace = synthetic_trace(n=200, rate=5.0)
    fast = simulate(trace, pd_config()).summary()
    slow_engine = replace(EngineModelConfig(), kv_transfer_bytes_per_s=EngineModelConfig().kv_transfer_bytes_per_s / 20)
    slow = simulate(trace, replace(pd_config(), engine=slow_engine)).summary()
    assert slow["ttft_s"]["p50"] > fast["ttft_s"]["p50"]


def test_sglang_prefill_waits_for_the_decode_reservation_and_vllm_prefill_does_not():
    """One decode rank that runs one request at a time: SGLang's prefill starts only when the decode side has
    reserved KV, so prompts wait on the decode pool; vLLM prefills first and the decode leg queues instead."""
    engine = replace(EngineModelConfig(), max_running_requests=1)
    trace = [TraceRequest(0.01 * i, 2_000, 200) for i in range(6)]
    for connector in CONNECTORS:
        config = replace(pd_config(connector, "round_robin", decode_dp_size=1, prefill_dp_size=4), engine=engine)
        last = run(trace, config).records[-1]
        assert last.prefill_answer_s is not None and last.first_token_s is not None
        # the one decode slot serialises the requests: the last one's first token waits for five whole decodes
        assert last.first_token_s > 5 * 199 * engine.decode_req_s
        if connector == "sglang":  # its prefill ran only once the slot was free: it answered with the KV
            assert last.prefill_answer_s == pytest.approx(last.first_token_s)
        else:  # it prefilled at once and answered long before its decode began
            assert last.prefill_answer_s < 0.2 * last.first_token_s


def test_each_leg_goes_where_its_policy_puts_it():
    trace = synthetic_trace(n=240)
    config = pd_config("sglang", "least_load", decode_policy="round_robin", decode_instances=2, decode_dp_size=4)
    sim = run(trace, config)
    assert sim.pd is not None
    decode = {k: n for k, n in sim.pd.legs_sent.items() if k.engine.startswith("d")}
    prefill = {k: n for k, n in sim.pd.legs_sent.items() if k.engine.startswith("p")}
    assert len(decode) == 8 and set(decode.values()) == {30}  # round robin over the 2 x 4 decode ranks
    assert len(prefill) == 8 and sum(prefill.values()) == len(trace)


def test_follow_bootstrap_room_spreads_prefills_at_random():
    trace = synthetic_trace(n=400)
    sim = run(trace, pd_config("sglang", "sbs", prefill_policy="follow_bootstrap_room"))
    assert sim.pd is not None
    prefill = Counter({k: n for k, n in sim.pd.legs_sent.items() if k.engine.startswith("p")})
    assert len(prefill) == 8 and max(prefill.values()) < 2 * min(prefill.values())


def test_information_limits_delay_both_legs():
    trace = synthetic_trace(n=200, rate=5.0)
    limits = InformationLimits(dispatch_latency_s=0.02)
    near = simulate(trace, pd_config("vllm")).summary()
    far = simulate(trace, replace(pd_config("vllm"), limits=limits)).summary()
    # vLLM's legs are sequential: prefill there, its answer back, the decode leg there, its first token back
    assert far["ttft_s"]["p50"] >= near["ttft_s"]["p50"] + 4 * 0.02 - 1e-9


def test_pools_refuse_bad_sizes_and_follow_bootstrap_room_without_sglang():
    with pytest.raises(ValueError, match="instance"):
        PdPools(prefill_instances=0)
    with pytest.raises(ValueError, match="SGLang"):
        PdPools(connector="vllm", prefill_policy="follow_bootstrap_room")


def test_cli_simulates_pd_pools_and_refuses_half_a_deployment(tmp_path):
    out = tmp_path / "pd.json"
    args = ["simulate", "--trace", "azure-code", "--duration", "60", "--policy", "sbs", "--no-progress"]
    result = CliRunner().invoke(main, [*args, "--prefill-pool", "2x4", "--decode-pool", "1x8", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "P/D: prefill 2 x 4, decode 1 x 8 DP ranks, sglang handoff" in result.output
    summary = json.loads(out.read_text())["sbs"]
    assert summary["completed"] > 0 and summary["failed"] == 0
    half = CliRunner().invoke(main, [*args, "--prefill-pool", "2x4"])
    assert half.exit_code == 2 and "--prefill-pool and --decode-pool go together" in half.output
    bad = CliRunner().invoke(main, [*args, "--prefill-pool", "2by4", "--decode-pool", "1x8"])
    assert bad.exit_code == 2 and "INSTANCESxDP" in bad.output
    stray = CliRunner().invoke(main, [*args, "--decode-policy", "round_robin"])
    assert stray.exit_code == 2 and "only apply with --prefill-pool" in stray.output


def test_a_scrape_reports_the_queues_the_engines_report():
    """SGLang: a decode rank's pre-allocation and transfer queues count as its running requests and its KV includes
    the reservations to come (``GET /v1/loads``); a prefill rank's bootstrap queue counts as waiting."""
    engine = replace(EngineModelConfig(), max_running_requests=1)
    config = replace(pd_config("sglang", "round_robin", decode_dp_size=1, prefill_dp_size=1), engine=engine)
    sim = _Sim([TraceRequest(0.0, 2_000, 100)] * 3, config)
    assert sim.pd is not None
    for request_id in ("0", "1", "2"):
        sim.pd.send(request_id, RankKey("p0", 0), RankKey("d0", 0), 2_000, 100, ())
        sim.pd.handle("legs", request_id)
    decode = sim.pd.rank_metrics("d0", sim.engines["d0"].rank_stats(), 0.0, False)[0]
    assert (decode.running, decode.decode_prealloc, decode.decode_transfer) == (3, 2, 1)
    assert decode.kv_tokens == 3 * 2_000  # one reservation made, two to come
    prefill = sim.pd.rank_metrics("p0", sim.engines["p0"].rank_stats(), 0.0, False)[0]
    # the first prefill started at once (its decode side had reserved) and its step holds the KV already
    assert (prefill.waiting, prefill.prefill_bootstrap, prefill.prefill_inflight) == (2, 2, 1)
