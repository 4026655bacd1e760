"""Step phase tracking and phase-aware placement, driven by tables of numbers."""

from __future__ import annotations

import math

import pytest

from gateway.scheduling.phase import phase_fill
from gateway.scheduling.prefix_index import PrefixIndex
from gateway.scheduling.step_clock import StepClock, StepTimeModel
from gateway.types import RankKey
from tests.helpers import rank, req


def test_step_time_model_recovers_the_coefficients_of_timed_steps():
    """Recursive least squares on steps ``d = 0.011 + 4.6e-5 * H + 6.1e-5 * S`` (the simulated SGLang rank's shape),
    from a wrong prior, with varied H and S."""
    model = StepTimeModel(0.05, 1e-4)
    for i in range(400):
        heaviest = float((i * 37) % 1024)
        mean = heaviest * ((i * 11) % 8 + 1) / 8
        model.observe(0.011 + 4.6e-5 * heaviest + 6.1e-5 * mean, heaviest, mean)
    a, b, c = model.coefficients
    assert a == pytest.approx(0.011, rel=0.02)
    assert b == pytest.approx(4.6e-5, rel=0.02) and c == pytest.approx(6.1e-5, rel=0.02)
    assert model.predict(1024, 512) == pytest.approx(0.011 + 4.6e-5 * 1024 + 6.1e-5 * 512, rel=0.01)
    assert model.observations == 400


def test_step_clock_learns_only_from_steps_that_end_with_tokens():
    clock = StepClock(0.05, initial_per_token_s=1e-3, boundary_gap_s=0.005)
    queued = [(RankKey("e", 0), 0, 1000), (RankKey("e", 1), 400, 1000)]
    assert clock.time_to_next_step("e", 0.0) == 0.0  # never seen: assume it can start now
    assert clock.observe_tokens("e", 0.000, queued)  # nobody decodes: the step may end silently
    assert not clock.observe_tokens("e", 0.002, queued)  # same burst
    assert clock.predict("e", 0) == 0.05 and clock.predict("e", 100) == pytest.approx(0.15)
    assert clock.current_step_prefill_tokens("e") == 400
    assert clock.time_to_next_step("e", 0.1) == pytest.approx(0.05 + 0.4 - 0.1)
    clock.observe_tokens("e", 2.0, queued)  # 2 s later: several steps, or an idle spell; not learnt
    assert clock.model("e").observations == 0
    clock.observe_tokens("e", 2.1, queued, decodes_next=True)  # rank 0 decodes: the next burst ends this step
    clock.observe_tokens("e", 2.2, queued)
    assert clock.model("e").observations == 1
    clock.observe_tokens("e", 2.3, queued, decodes_next=True)
    clock.still_timed("e", decodes_next=False)  # its only decoding request finished with that token
    clock.observe_tokens("e", 3.0, queued)
    assert clock.model("e").observations == 1


def test_step_clock_mean_step_time_is_an_ewma_of_timed_steps_per_engine_averaged_over_engines():
    clock = StepClock(0.05, mean_alpha=0.5, max_step_s=30.0)
    assert clock.mean_step_s() == 0.05  # nothing seen: the initial guess

    def burst(engine: str, t: float, decodes_next: bool = True) -> None:
        clock.observe_tokens(engine, t, [], decodes_next=decodes_next)

    for t in (0.0, 0.1, 0.3):  # engine "a": steps of 0.1 s then 0.2 s
        burst("a", t)
    burst("a", 0.301)  # same burst: no step
    for t in (0.0, 0.4, 100.4):  # engine "b": a step of 0.4 s, then 100 s of silence (idle, not a step)
        burst("b", t)
    burst("c", 0.0)  # one boundary only: no step time yet
    for t in (0.0, 0.7, 0.8):  # engine "d": nobody decoded at 0.0, so 0.7 s may be several steps; then 0.1 s
        burst("d", t, decodes_next=t > 0)
    assert clock.engine_mean_step_s("a") == pytest.approx(0.15)
    assert clock.engine_mean_step_s("b") == pytest.approx(0.4)
    assert clock.engine_mean_step_s("c") == 0.05
    assert clock.engine_mean_step_s("d") == pytest.approx(0.1)
    assert clock.mean_step_s() == pytest.approx((0.15 + 0.4 + 0.1) / 3)


def test_drain_seconds_count_whole_steps_of_the_instance_s_next_step_length():
    clock = StepClock(0.01, initial_per_token_s=1e-5)  # prior: 10 ms + 10 us per token of the heaviest rank
    queued = [(RankKey("e", 0), 3000, 1000), (RankKey("e", 1), 200, 1000), (RankKey("e", 2), 0, 1000)]
    step = 0.01 + 1000 * 1e-5  # the heaviest rank fills its budget
    assert clock.drain_s("e", queued) == {
        RankKey("e", 0): pytest.approx(3 * step),
        RankKey("e", 1): pytest.approx(step),  # less than a budget still takes a step
        RankKey("e", 2): 0.0,
    }
    assert clock.drain_s("e", []) == {}


@pytest.mark.parametrize("kw", [dict(initial_step_s=0.0), dict(forgetting=0.0), dict(mean_alpha=1.5)])
def test_step_clock_rejects_bad_settings(kw):
    args = dict(initial_step_s=0.05) | kw
    with pytest.raises(ValueError):
        StepClock(**args)


def busy_clock(ends: dict[str, float], step_s: float = 1.0) -> StepClock:
    clock = StepClock(step_s, initial_per_token_s=1e-4)
    for engine, last_boundary in ends.items():
        clock.on_tokens(engine, last_boundary)
    return clock


@pytest.mark.parametrize(
    ("engines", "loads", "winner"),
    [
        # an idle instance starts at once; the busy one is 0.9 s from its next step
        ({"a": 0.0}, {"a": dict(running=5), "b": {}}, "b/0"),
        # both busy: the one whose step ends sooner
        ({"a": 0.0, "b": 0.8}, {"a": dict(running=5), "b": dict(running=5)}, "a/0"),
        # same phase: the rank with no prompt tokens bound for the next step
        ({"a": 0.0}, {"a": dict(running=5, queued=3000)}, "a/1"),
    ],
)
def test_phase_fill_picks_the_soonest_first_token(engines, loads, winner):
    clock = busy_clock(engines)
    ranks = []
    for engine in ("a", "b"):
        kw = loads.get(engine)
        if kw is None:
            continue
        ranks.append(rank(engine, 0, **kw))
        ranks.append(rank(engine, 1, running=kw.get("running", 0)))
    allocation = phase_fill([req("r", 500)], ranks, clock, {}, now=0.1, max_wait_s=10, queue_steps=2)
    assert [str(k) for _, k in allocation.assigned] == [winner]


def test_phase_fill_avoids_a_rank_whose_queue_fills_whole_steps():
    clock = busy_clock({"a": 0.0, "b": 0.0})
    ranks = [rank("a", 0, running=1, queued=12000), rank("b", 0, running=1, queued=500)]
    current = {RankKey("a", 0): 0.0, RankKey("b", 0): 500.0}
    allocation = phase_fill([req("r", 800)], ranks, clock, current, now=0.1, max_wait_s=10, queue_steps=2)
    assert [str(k) for _, k in allocation.assigned] == ["b/0"]


def test_phase_fill_spreads_a_batch_over_an_idle_instance_longest_first():
    clock = busy_clock({})
    ranks = [rank("a", i) for i in range(4)]
    batch = [req(f"r{i}", t) for i, t in enumerate([300, 4000, 1200, 2500, 100])]
    allocation = phase_fill(batch, ranks, clock, {}, now=0.0, max_wait_s=10, queue_steps=2)
    placed = {r.request_id: k.rank for r, k in allocation.assigned}
    assert placed["r1"] != placed["r3"] != placed["r2"]
    assert len({placed["r1"], placed["r3"], placed["r2"]}) == 3  # the three long prompts run in parallel
    assert not allocation.deferred and not allocation.unplaceable


def test_phase_fill_defers_what_fits_nowhere_and_reports_unserved_models():
    clock = busy_clock({"a": 0.0})
    ranks = [rank("a", 0, running=1, queued=16000, budget=8192)]
    allocation = phase_fill(
        [req("big", 2000, arrival_s=0.05), req("other", 10, model="x")],
        ranks,
        clock,
        {},
        now=0.1,
        max_wait_s=10,
        queue_steps=2,
    )
    assert [r.request_id for r in allocation.deferred] == ["big"]
    assert [r.request_id for r in allocation.unplaceable] == ["other"]


def slow_and_fast_instances(b_queued: float = 0.0) -> list:
    """Instance ``a``: rank 0 holds 50,000 queued prompt tokens (over 5 budgets of 8192: a long prefill), rank 1
    is free. Instance ``b``: two ranks holding ``b_queued`` tokens each."""
    return [
        rank("a", 0, running=1, queued=50_000),
        rank("a", 1, running=1),
        rank("b", 0, running=1, queued=b_queued),
        rank("b", 1, running=1, queued=b_queued),
    ]


@pytest.mark.parametrize(("steps", "winner"), [(None, "b/0"), (40_960, "a/1")])
def test_long_prefill_isolation_sends_a_long_prompt_to_the_instance_already_prefilling_one(steps, winner):
    # b starts its next step sooner, so by cost alone the long prompt goes there and slows all of b's steps
    clock = busy_clock({"a": 0.8, "b": 0.0})
    allocation = phase_fill(
        [req("long", 45_000)], slow_and_fast_instances(), clock, {}, now=1.5, max_wait_s=10, queue_steps=2,
        long_prefill_tokens=steps,
    )  # fmt: skip
    assert [str(k) for _, k in allocation.assigned] == [winner]


@pytest.mark.parametrize(("steps", "winner"), [(None, "a/1"), (40_960, "b/0")])
def test_long_prefill_isolation_keeps_a_short_prompt_off_the_slow_instance(steps, winner):
    # a starts its next step much sooner, so by cost alone the short prompt would go there, into a's long steps
    clock = busy_clock({"a": 0.0, "b": 1.4})
    allocation = phase_fill(
        [req("short", 500)], slow_and_fast_instances(), clock, {}, now=1.5, max_wait_s=10, queue_steps=2,
        long_prefill_tokens=steps,
    )  # fmt: skip
    assert [str(k) for _, k in allocation.assigned] == [winner]


def test_long_prefill_isolation_still_uses_the_slow_instance_when_nothing_else_fits():
    clock = busy_clock({"a": 0.8, "b": 0.0})
    ranks = slow_and_fast_instances(b_queued=16_000)  # b is full: 2 budgets queued on each rank
    allocation = phase_fill(
        [req("short", 500)], ranks, clock, {}, now=1.5, max_wait_s=10, queue_steps=2, long_prefill_tokens=40_960
    )
    assert [str(k) for _, k in allocation.assigned] == ["a/1"] and not allocation.deferred


def test_phase_fill_counts_only_what_a_rank_must_prefill_and_groups_a_shared_prefix():
    """Rank a/1 holds the first 8 blocks (4,096 tokens) of the prompt: the request goes there although a/0 is as
    idle, and a second request of the batch sharing that prefix follows it; an unrelated prompt does not."""
    clock = busy_clock({})
    index = PrefixIndex(100_000)
    index.insert(RankKey("a", 1), tuple(range(8)))
    ranks = [rank("a", 0), rank("a", 1, queued=2000), rank("a", 2)]
    shared = req("s1", 4600, blocks=tuple(range(9)))
    follower = req("s2", 4500, blocks=(*range(8), 99))
    other = req("o", 4700, blocks=(50, 51))
    allocation = phase_fill(
        [shared, follower, other], ranks, clock, {}, now=0.0, max_wait_s=10, queue_steps=math.inf, prefix=index
    )
    placed = {r.request_id: str(k) for r, k in allocation.assigned}
    assert placed["s1"] == placed["s2"] == "a/1"
    assert placed["o"] != "a/1"
