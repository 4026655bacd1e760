"""The simulator's optional online correction of the prompt-token estimate (``InformationLimits.online_correction``,
off by default): the simulated gateway learns from each finish's true count, as the live gateway learns from the
engines' ``usage.prompt_tokens``."""

from __future__ import annotations

import math

import pytest

from gateway.sim.information import InformationLimits, TokenEstimateError
from gateway.sim.simulate import SimConfig, simulate
from tests.unit.test_information import Spy, synthetic_trace

CHINESE = TokenEstimateError(0.854, 0.058)
"""The measured error of the four-characters estimate on Chinese text (``bench/results/token_estimate_error.md``)."""


@pytest.mark.parametrize("policy", ["sbs", "least_tokens"])
def test_the_scheduler_sees_estimates_corrected_towards_the_truth(policy):
    trace = synthetic_trace(n=600, rate=5.0)  # a load the cluster keeps up with: reports come back meanwhile
    limits = InformationLimits(estimate_error=CHINESE, online_correction=True)
    spy = Spy(trace, SimConfig(policy=policy, dp_size=4, limits=limits))
    spy.run()
    pairs = zip(trace, spy.submitted, strict=True)
    late = [math.log(true.prompt_tokens / seen.prompt_tokens) for true, seen in pairs][-100:]
    assert abs(sum(late) / len(late)) < 0.1  # the uncorrected estimate is 0.854 off in log
    assert spy.sim.correction is not None
    assert spy.sim.correction.factor == pytest.approx(math.exp(CHINESE.mu), rel=0.1)
    assert spy.engine_prompts == {str(i): r.prompt_tokens for i, r in enumerate(trace)}


def test_off_by_default_and_the_figures_move_only_when_on():
    trace = synthetic_trace()
    off = SimConfig(policy="sbs", dp_size=4, limits=InformationLimits(estimate_error=CHINESE))
    on = SimConfig(policy="sbs", dp_size=4, limits=InformationLimits(estimate_error=CHINESE, online_correction=True))
    assert InformationLimits().online_correction is False
    assert simulate(trace, off).summary() == simulate(trace, off).summary()
    assert simulate(trace, on).summary() != simulate(trace, off).summary()
