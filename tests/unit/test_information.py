"""The simulator's information limits: estimated prompt tokens, non-streamed requests, dispatch latency."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from click.testing import CliRunner

from gateway.cli import main
from gateway.sim.information import (
    MEASURED_ESTIMATE_ERRORS,
    InformationLimits,
    TokenEstimateError,
    draw_request_views,
    measured_estimate_error,
    parse_estimate_error,
)
from gateway.sim.simulate import SimConfig, _Sim, simulate
from gateway.types import PendingRequest
from gateway.workload.traces import TraceRequest


def synthetic_trace(n: int = 300, rate: float = 30.0, seed: int = 1) -> list[TraceRequest]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(TraceRequest(t, rng.randint(50, 6000), rng.randint(1, 200)))
    return out


class Spy:
    """Records what a simulation's scheduler is told and what its engines are given."""

    def __init__(self, trace: list[TraceRequest], config: SimConfig) -> None:
        self.sim = _Sim(trace, config)
        self.submitted: list[PendingRequest] = []
        self.engine_prompts: dict[str, int] = {}
        self.engine_arrivals: dict[str, float] = {}
        self.first_tokens: set[str] = set()
        self.token_reports: set[str] = set()
        self.finishes: set[str] = set()
        scheduler = self.sim.scheduler
        submit, on_first, on_tokens, on_finish = (
            scheduler.submit,
            scheduler.on_first_token,
            scheduler.on_tokens,
            scheduler.on_finish,
        )

        def spy_submit(request: PendingRequest, now: float) -> Any:
            self.submitted.append(request)
            return submit(request, now)

        def spy_first(request_id: str, engine: str, now: float) -> Any:
            self.first_tokens.add(request_id)
            return on_first(request_id, engine, now)

        def spy_tokens(request_id: str, engine: str, n: int, now: float) -> Any:
            self.token_reports.add(request_id)
            return on_tokens(request_id, engine, n, now)

        def spy_finish(request_id: str, now: float) -> Any:
            self.finishes.add(request_id)
            return on_finish(request_id, now)

        scheduler.submit = spy_submit  # type: ignore[method-assign]
        scheduler.on_first_token = spy_first  # type: ignore[method-assign]
        scheduler.on_tokens = spy_tokens  # type: ignore[method-assign]
        scheduler.on_finish = spy_finish  # type: ignore[method-assign]
        for engine in self.sim.engines.values():
            add = engine.add_request

            def spy_add(request_id: str, rank: int, prompt: int, output: int, add: Any = add, **options: Any) -> None:
                self.engine_prompts[request_id] = prompt
                self.engine_arrivals[request_id] = self.sim.now
                add(request_id, rank, prompt, output, **options)

            engine.add_request = spy_add  # type: ignore[method-assign]

    def run(self) -> Any:
        return self.sim.run()


@pytest.mark.parametrize(
    ("error", "true_tokens", "expected"),
    [
        (TokenEstimateError(0.0, 0.0), 1000, 1000),
        (TokenEstimateError(math.log(2), 0.0), 1000, 500),  # the gateway sees half the true count
        (TokenEstimateError(math.log(0.5), 0.0), 1000, 2000),
        (TokenEstimateError(math.log(1000), 0.0), 10, 1),  # never below one token
    ],
)
def test_an_estimate_is_the_true_count_over_the_drawn_ratio(error, true_tokens, expected):
    assert error.estimate(true_tokens, random.Random(0)) == expected


def test_estimates_follow_the_lognormal_they_are_drawn_from():
    error = TokenEstimateError(0.2, 0.3)
    views = draw_request_views([10_000] * 4000, InformationLimits(estimate_error=error), seed=3)
    logs = [math.log(10_000 / v.prompt_tokens) for v in views]
    mean = sum(logs) / len(logs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (len(logs) - 1))
    assert mean == pytest.approx(0.2, abs=0.02) and sd == pytest.approx(0.3, abs=0.02)


@pytest.mark.parametrize(
    ("limits", "stream_share", "delay_range"),
    [
        (InformationLimits(), 1.0, (0.0, 0.0)),
        (InformationLimits(nonstream_share=0.3), 0.7, (0.0, 0.0)),
        (InformationLimits(nonstream_share=1.0), 0.0, (0.0, 0.0)),
        (InformationLimits(nonstream_share=0.3, stream_upstream=True), 1.0, (0.0, 0.0)),  # the gateway streams
        (InformationLimits(dispatch_latency_s=0.002), 1.0, (0.002, 0.002)),
        (InformationLimits(dispatch_latency_s=0.002, dispatch_jitter_s=0.001), 1.0, (0.002, 0.003)),
    ],
)
def test_request_views_draw_each_limit_deterministically(limits, stream_share, delay_range):
    views = draw_request_views(list(range(1, 5001)), limits, seed=7)
    assert views == draw_request_views(list(range(1, 5001)), limits, seed=7)
    assert [v.prompt_tokens for v in views] == list(range(1, 5001))
    assert sum(v.stream for v in views) / len(views) == pytest.approx(stream_share, abs=0.02)
    for v in views:
        assert delay_range[0] <= v.to_engine_s <= delay_range[1]
        assert delay_range[0] <= v.to_gateway_s <= delay_range[1]


def test_switching_one_limit_on_leaves_the_others_draws_alone():
    error = InformationLimits(estimate_error=TokenEstimateError(0.0, 0.3))
    both = InformationLimits(estimate_error=TokenEstimateError(0.0, 0.3), nonstream_share=0.3)
    assert [v.prompt_tokens for v in draw_request_views([4000] * 100, error, 1)] == [
        v.prompt_tokens for v in draw_request_views([4000] * 100, both, 1)
    ]


@pytest.mark.parametrize(
    ("name", "kind"), [("measured", "chat"), ("chat", "chat"), ("chinese", "chinese"), ("code", "code")]
)
def test_measured_errors_by_name(name, kind):
    assert measured_estimate_error(name) == MEASURED_ESTIMATE_ERRORS[kind]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("none", None),
        ("measured", MEASURED_ESTIMATE_ERRORS["chat"]),
        ("chinese", MEASURED_ESTIMATE_ERRORS["chinese"]),
        ("0,0.3", TokenEstimateError(0.0, 0.3)),
        ("-0.1,0", TokenEstimateError(-0.1, 0.0)),
    ],
)
def test_estimate_errors_from_the_command_line(spec, expected):
    assert parse_estimate_error(spec) == expected


@pytest.mark.parametrize("spec", ["0,-0.3", "a,b", "0.3", "klingon"])
def test_a_bad_estimate_error_is_refused(spec):
    with pytest.raises(ValueError):
        parse_estimate_error(spec)


def test_cli_simulate_refuses_a_bad_estimate_error():
    result = CliRunner().invoke(main, ["simulate", "--trace", "azure-code", "--estimate-error", "0,-1"])
    assert result.exit_code == 2 and "--estimate-error" in result.output


def test_an_unknown_measured_error_names_the_known_ones():
    with pytest.raises(ValueError, match="measured"):
        measured_estimate_error("klingon")


@pytest.mark.parametrize("kwargs", [{"nonstream_share": -0.1}, {"nonstream_share": 1.5}, {"dispatch_latency_s": -1.0}])
def test_nonsense_limits_are_refused(kwargs):
    with pytest.raises(ValueError):
        InformationLimits(**kwargs)


@pytest.mark.parametrize("policy", ["sbs", "least_tokens"])
def test_with_every_limit_off_the_figures_are_those_of_the_idealised_gateway(policy):
    trace = synthetic_trace()
    plain = simulate(trace, SimConfig(policy=policy, dp_size=4)).summary()
    off = SimConfig(policy=policy, dp_size=4, limits=InformationLimits(nonstream_share=0.0, dispatch_latency_s=0.0))
    assert simulate(trace, off).summary() == plain


@pytest.mark.parametrize("policy", ["sbs", "least_tokens"])
def test_with_an_estimate_error_the_engine_gets_the_true_count_and_the_scheduler_the_estimate(policy):
    trace = synthetic_trace()
    limits = InformationLimits(estimate_error=TokenEstimateError(0.3, 0.3))
    spy = Spy(trace, SimConfig(policy=policy, dp_size=4, limits=limits))
    spy.run()
    estimates = [v.prompt_tokens for v in draw_request_views([r.prompt_tokens for r in trace], limits, 0)]
    assert [r.prompt_tokens for r in spy.submitted] == estimates
    assert estimates != [r.prompt_tokens for r in trace]
    assert spy.engine_prompts == {str(i): r.prompt_tokens for i, r in enumerate(trace)}


def test_the_scheduler_gets_no_first_token_or_tokens_of_a_nonstreamed_request():
    trace = synthetic_trace()
    spy = Spy(trace, SimConfig(policy="sbs", dp_size=4, limits=InformationLimits(nonstream_share=0.3)))
    result = spy.run()
    nonstreamed = {r.request_id for r in spy.submitted if not r.stream}
    assert 0.2 < len(nonstreamed) / len(trace) < 0.4
    assert spy.first_tokens == {str(i) for i in range(len(trace))} - nonstreamed
    assert spy.token_reports.isdisjoint(nonstreamed)
    assert spy.finishes == {str(i) for i in range(len(trace))}
    assert all(r.first_token_s is not None and r.done_s is not None for r in result.records)


def test_a_request_reaches_its_engine_after_the_dispatch_delay_and_its_tokens_come_back_later():
    trace = synthetic_trace(n=150)
    limits = InformationLimits(dispatch_latency_s=0.002, dispatch_jitter_s=0.001)
    spy = Spy(trace, SimConfig(policy="sbs", dp_size=4, limits=limits))
    result = spy.run()
    views = draw_request_views([r.prompt_tokens for r in trace], limits, 0)
    for i, record in enumerate(result.records):
        assert record.sent_s is not None
        assert spy.engine_arrivals[str(i)] == pytest.approx(record.sent_s + views[i].to_engine_s)
    assert len(spy.finishes) == len(trace)
    assert result.summary()["completed"] == len(trace)


def test_alone_a_request_waits_out_both_trips():
    trace = [TraceRequest(0.0, 3000, 5)]
    limits = InformationLimits(dispatch_latency_s=0.002, dispatch_jitter_s=0.001)
    view = draw_request_views([3000], limits, 0)[0]
    plain = simulate(trace, SimConfig(policy="least_tokens", dp_size=4)).records[0]
    delayed = simulate(trace, SimConfig(policy="least_tokens", dp_size=4, limits=limits)).records[0]
    trips = view.to_engine_s + view.to_gateway_s
    assert delayed.ttft_s == pytest.approx(plain.ttft_s + trips)
    assert delayed.e2e_s == pytest.approx(plain.e2e_s + trips)


def test_every_limit_on_is_deterministic_for_a_seed_and_differs_across_seeds():
    trace = synthetic_trace()
    limits = InformationLimits(
        estimate_error=TokenEstimateError(0.04, 0.3),
        nonstream_share=0.3,
        dispatch_latency_s=0.002,
        dispatch_jitter_s=0.001,
    )
    first = simulate(trace, SimConfig(dp_size=4, limits=limits)).summary()
    assert first == simulate(trace, SimConfig(dp_size=4, limits=limits)).summary()
    assert first["completed"] == len(trace)
    assert first != simulate(trace, SimConfig(dp_size=4, limits=limits, seed=1)).summary()


def test_cli_simulate_takes_the_information_limits(tmp_path):
    args = ["simulate", "--trace", "azure-code", "--duration", "30", "--policy", "sbs", "--no-progress"]
    out_plain, out_limited = tmp_path / "plain.json", tmp_path / "limited.json"
    plain = CliRunner().invoke(main, [*args, "--output", str(out_plain)])
    limited = CliRunner().invoke(
        main,
        [
            *args,
            "--estimate-error",
            "measured",
            "--nonstream-share",
            "0.3",
            "--dispatch-latency-ms",
            "2",
            "--dispatch-jitter-ms",
            "1",
            "--output",
            str(out_limited),
        ],
    )
    assert plain.exit_code == 0, plain.output
    assert limited.exit_code == 0, limited.output
    assert out_plain.read_text() != out_limited.read_text()
