"""Virtual-time simulation: the gateway's scheduler in front of engine models."""

from __future__ import annotations

import random
from typing import get_args

import pytest
from click.testing import CliRunner

from gateway.cli import main
from gateway.config import PolicyName
from gateway.replay.traces import TraceRequest
from gateway.sim.simulate import SimConfig, simulate


def synthetic_trace(n: int = 400, rate: float = 40.0, seed: int = 1) -> list[TraceRequest]:
    rng = random.Random(seed)
    t = 0.0
    out = []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(TraceRequest(t, rng.randint(50, 6000), rng.randint(1, 300)))
    return out


@pytest.mark.parametrize("policy", get_args(PolicyName))
def test_every_request_completes_and_runs_are_deterministic(policy):
    trace = synthetic_trace()
    config = SimConfig(policy=policy, instances=2, dp_size=4)
    first = simulate(trace, config).summary()
    assert first["completed"] == len(trace) and first["failed"] == 0
    assert first == simulate(trace, config).summary()
    assert 0 < first["ttft_s"]["p50"] <= first["ttft_s"]["p99"] <= first["e2e_s"]["max"]
    assert first["step_imbalance"]["mean"] >= 1.0


def test_ttft_grows_with_load():
    trace = synthetic_trace(rate=10.0)
    light = simulate(trace, SimConfig(policy="sbs", instances=1, dp_size=4)).summary()
    heavy_trace = [TraceRequest(r.arrival_s / 8, r.prompt_tokens, r.output_tokens) for r in trace]
    heavy = simulate(heavy_trace, SimConfig(policy="sbs", instances=1, dp_size=4)).summary()
    assert heavy["ttft_s"]["mean"] > light["ttft_s"]["mean"]


def test_cli_simulate_writes_json(tmp_path):
    out = tmp_path / "sim.json"
    result = CliRunner().invoke(
        main,
        [
            "simulate",
            "--trace",
            "azure-code",
            "--duration",
            "60",
            "--policy",
            "sbs",
            "--policy",
            "round_robin",
            "--instances",
            "1",
            "--dp-size",
            "4",
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "sbs" in result.output and "round_robin" in result.output
    assert out.read_text().count('"completed"') == 2
