"""The simulator's optional remedies for the gateway's prompt-token estimate, both off by default: the online
correction (``InformationLimits.online_correction``: the simulated gateway learns from each finish's true count, as
the live gateway learns from the engines' ``usage.prompt_tokens``), and the engine's own count of queued prefill
tokens in each scrape (``SimConfig.engine_queued_tokens``, as SGLang's ``/v1/loads`` reports it)."""

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


def test_scrapes_carry_the_engines_queued_tokens_only_when_asked():
    trace = synthetic_trace()
    limits = InformationLimits(estimate_error=TokenEstimateError(-0.69, 0.0))  # every prompt estimated twice over
    seen: dict[bool, list] = {}
    for on in (False, True):
        spy = Spy(trace, SimConfig(policy="sbs", dp_size=4, limits=limits, engine_queued_tokens=on))
        scrapes = seen[on] = []
        on_scrape = spy.sim.scheduler.on_scrape

        def record(engine, ranks, now, on_scrape=on_scrape, scrapes=scrapes):
            scrapes.append(ranks)
            return on_scrape(engine, ranks, now)

        spy.sim.scheduler.on_scrape = record
        spy.run()
    assert all(m.queued_prefill_tokens is None for ranks in seen[False] for m in ranks.values())
    reported = [m.queued_prefill_tokens for ranks in seen[True] for m in ranks.values()]
    assert all(q is not None and q >= 0 for q in reported) and any(q > 0 for q in reported)


def test_the_engines_queued_tokens_change_the_figures_only_when_on():
    trace = synthetic_trace()
    limits = InformationLimits(estimate_error=TokenEstimateError(-0.69, 0.0))
    off = SimConfig(policy="sbs", dp_size=4, limits=limits)
    on = SimConfig(policy="sbs", dp_size=4, limits=limits, engine_queued_tokens=True)
    assert SimConfig().engine_queued_tokens is False
    assert simulate(trace, on).summary() != simulate(trace, off).summary()
