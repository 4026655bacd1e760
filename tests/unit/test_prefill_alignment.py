"""The engines' own prefill alignment in the engine model: SGLang's PrefillDelayer and vLLM's
``--prefill-schedule-interval``. Table-driven, deterministic: each case drives steps and reads which ranks prefilled."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from gateway.sim.calibration import EngineModelConfig
from gateway.sim.engine_defaults import SGLANG_HELD_PASS_S
from gateway.sim.engine_model import EngineModel

IDEALISED = EngineModelConfig()


def model(dp_size: int, **overrides: Any) -> EngineModel:
    return EngineModel(replace(IDEALISED, **overrides), dp_size)


def start_decoding(m: EngineModel, rank: int, n: int, output: int = 1000) -> None:
    """Put ``n`` requests of 100 prompt tokens decoding on ``rank`` (one step of prefill)."""
    for i in range(n):
        m.add_request(f"d{rank}-{i}", rank, 100, output)


def prefilling_ranks(m: EngineModel, steps: int) -> list[tuple[int, ...]]:
    """For each of ``steps`` steps, the ranks that prefilled something."""
    out = []
    for _ in range(steps):
        result = m.step()
        out.append(tuple(r for r, t in enumerate(result.prefill_tokens_per_rank) if t))
    return out


# --- SGLang PrefillDelayer ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_delay_passes", "late_rank_joins_at", "expected"),
    [
        # rank 0 can prefill, rank 1 cannot ("mixed"): held for at most max_delay_passes - 1 passes, then let through
        (30, None, [()] * 29 + [(0,)]),
        (8, None, [()] * 7 + [(0,)]),
        (1, None, [(0,)]),  # a bound of 1 never holds
        # rank 1 gets a request after 3 held passes: both prefill together on the next pass ("wait_success")
        (30, 3, [(), (), (), (0, 1)]),
    ],
)
def test_delayer_holds_a_mixed_instance_at_most_its_bound(
    max_delay_passes: int, late_rank_joins_at: int | None, expected: list[tuple[int, ...]]
) -> None:
    m = model(2, enable_prefill_delayer=True, prefill_delayer_max_delay_passes=max_delay_passes)
    start_decoding(m, 0, 1)
    start_decoding(m, 1, 1)
    m.step()  # both ranks prefill together: nothing held
    m.add_request("new", 0, 500, 10)
    seen = []
    for i in range(len(expected)):
        if late_rank_joins_at is not None and i == late_rank_joins_at:
            m.add_request("late", 1, 500, 10)
        seen += prefilling_ranks(m, 1)
    assert seen == expected


def test_a_held_pass_with_nothing_to_run_costs_no_forward() -> None:
    m = model(2, enable_prefill_delayer=True)
    m.add_request("a", 0, 100, 10)
    m.add_request("b", 1, 100, 10)
    m.step()  # both ranks prefill together: nothing held
    while m.has_work():
        m.step()
    m.add_request("new", 0, 500, 10)  # mixed, and nothing runs anywhere: the pass is held without a forward
    held = m.step()
    assert held.prefill_tokens_per_rank == [0, 0] and held.duration_s == SGLANG_HELD_PASS_S
    decoding = model(2, enable_prefill_delayer=True)
    start_decoding(decoding, 0, 1)
    start_decoding(decoding, 1, 1)
    decoding.step()
    decoding.add_request("new", 0, 500, 10)  # held while the ranks decode: a full forward pass
    assert decoding.step().duration_s >= IDEALISED.alltoall_s


def test_delayer_off_prefills_at_once() -> None:
    m = model(2)
    start_decoding(m, 0, 1)
    start_decoding(m, 1, 1)
    m.step()
    m.add_request("new", 0, 500, 10)
    assert prefilling_ranks(m, 1) == [(0,)]


def test_delayer_held_ranks_keep_decoding() -> None:
    m = model(2, enable_prefill_delayer=True)
    start_decoding(m, 0, 3)
    start_decoding(m, 1, 2)
    m.step()
    m.add_request("new", 0, 500, 10)
    result = m.step()
    assert result.prefill_tokens_per_rank == [0, 0]
    assert result.decode_reqs_per_rank == [3, 2]


def test_delayer_lets_a_chunked_prompt_continue() -> None:
    """A rank part-way through a chunked prompt reports prefillable and continues it whatever the verdict."""
    m = model(2, enable_prefill_delayer=True, max_prefill_tokens_per_step=100)
    start_decoding(m, 1, 1)
    m.add_request("long", 0, 250, 10)  # 3 chunks of at most 100
    m.step()  # all-ranks prefill: rank 0 takes its first chunk, rank 1 its decode request's prompt
    m.add_request("new", 0, 50, 10)  # behind the chunked prompt, on the same rank
    steps = [m.step() for _ in range(2)]
    assert [s.prefill_tokens_per_rank[0] for s in steps] == [100, 50]  # the chunks go on; "new" is held


@pytest.mark.parametrize(
    ("watermark", "held"),
    [(None, True), (0.5, False), (1e-9, True)],  # KV usage of the prefillable rank is tiny, so 0.5 forces
)
def test_delayer_low_watermark_lets_prefill_through(watermark: float | None, held: bool) -> None:
    m = model(2, enable_prefill_delayer=True, prefill_delayer_token_usage_low_watermark=watermark)
    start_decoding(m, 0, 1)
    start_decoding(m, 1, 1)
    m.step()
    m.add_request("new", 0, 500, 10)
    assert prefilling_ranks(m, 1) == ([()] if held else [(0,)])


def test_delayer_slot_condition_holds_when_running_slots_run_short() -> None:
    """All ranks can prefill, but fewer running slots are free than the largest recent prefill batch: held, except
    the first time (SGLang's ``skip_first_delayer``)."""
    m = model(2, enable_prefill_delayer=True, max_running_requests=6)
    start_decoding(m, 0, 4)
    start_decoding(m, 1, 4)
    m.step()  # a prefill batch of 4 on each rank: max_prefill_bs = 4, free slots 2 < 4
    for rank in (0, 1):
        m.add_request(f"a{rank}", rank, 50, 1000)
    assert prefilling_ranks(m, 1) == [(0, 1)]  # the first hold is skipped
    for rank in (0, 1):
        m.add_request(f"b{rank}", rank, 50, 1000)
    assert prefilling_ranks(m, 3) == [(), (), ()]


def test_delayer_aligns_prefill_across_ranks() -> None:
    """Requests reaching ranks on different steps prefill in one step once every rank has one."""
    m = model(4, enable_prefill_delayer=True)
    for rank in range(4):
        start_decoding(m, rank, 1)
    m.step()
    joined: list[tuple[int, ...]] = []
    for rank in range(4):
        m.add_request(f"n{rank}", rank, 300, 10)
        joined += prefilling_ranks(m, 1)
    assert joined == [(), (), (), (0, 1, 2, 3)]


# --- vLLM --prefill-schedule-interval ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("interval", "expected"),
    [
        (1, [(0, 1)] * 6),  # off: every step
        (2, [(0, 1), (), (0, 1), (), (0, 1), ()]),
        (3, [(0, 1), (), (), (0, 1), (), ()]),
    ],
)
def test_interval_prefills_only_every_nth_step_on_all_ranks(interval: int, expected: list[tuple[int, ...]]) -> None:
    """Both ranks decode and have long prompts queued (the decode's prompt and a first chunk in step 0, then chunks
    of 200): prefill runs on the cadence only, counted from the step the instance became busy, on every rank."""
    m = model(2, prefill_schedule_interval=interval, max_prefill_tokens_per_step=200)
    for rank in (0, 1):
        m.add_request(f"d{rank}", rank, 100, 1000)
        m.add_request(f"p{rank}", rank, 10_000, 10)
    assert prefilling_ranks(m, 6) == expected


def test_interval_does_not_hold_a_rank_without_decodes() -> None:
    """vLLM defers prefill only where a running request can decode in its place."""
    m = model(2, prefill_schedule_interval=2, max_prefill_tokens_per_step=200)
    m.add_request("d0", 0, 100, 1000)
    m.add_request("p0", 0, 10_000, 10)
    m.add_request("p1", 1, 10_000, 10)  # rank 1 has nothing decoding
    assert prefilling_ranks(m, 4) == [(0, 1), (1,), (0, 1), (1,)]


def test_interval_counter_restarts_when_the_instance_goes_idle() -> None:
    m = model(2, prefill_schedule_interval=2)
    m.add_request("a", 0, 100, 1)
    assert prefilling_ranks(m, 1) == [(0,)]
    assert not m.has_work()
    m.step()  # idle: no step
    m.add_request("d", 1, 100, 50)
    m.add_request("b", 0, 100, 1)
    assert prefilling_ranks(m, 1) == [(0, 1)]  # step 0 of a new busy period


def test_interval_capacity_bound_rank_is_not_held() -> None:
    """A prefill-carrying step that leaves requests waiting lifts the hold on that rank until a release drains it."""
    m = model(2, prefill_schedule_interval=2, max_prefill_tokens_per_step=100)
    for rank in (0, 1):
        m.add_request(f"d{rank}", rank, 100, 1000)
    m.step()  # both decode from now on
    m.step()  # off cadence, nothing waiting
    for i in range(3):
        m.add_request(f"q{i}", 0, 80, 10)  # more than one step's budget on rank 0
    m.add_request("r", 1, 80, 10)
    assert prefilling_ranks(m, 4) == [(0, 1), (0,), (0,), ()]


def test_interval_on_one_rank_counts_from_the_last_prefill_step() -> None:
    m = model(1, prefill_schedule_interval=3, max_prefill_tokens_per_step=100)
    m.add_request("d", 0, 100, 1000)
    m.step()
    m.add_request("p", 0, 10_000, 10)
    assert prefilling_ranks(m, 6) == [(), (), (0,), (), (), (0,)]  # 3 steps after the prefill of "d"


@pytest.mark.parametrize(
    "overrides",
    [
        {"prefill_schedule_interval": 0},
        {"prefill_delayer_max_delay_passes": 0},
        {"prefill_delayer_token_usage_low_watermark": 1.5},
    ],
)
def test_alignment_settings_that_cannot_hold_are_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        replace(IDEALISED, **overrides)


# --- the engines' flags on the command line ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("flavor", "flags", "delayer", "passes", "interval"),
    [
        ("sglang", {}, False, 30, 1),
        ("sglang", {"enable_prefill_delayer": True}, True, 30, 1),
        ("sglang", {"enable_prefill_delayer": True, "prefill_delayer_max_delay_passes": 8}, True, 8, 1),
        ("vllm", {"prefill_schedule_interval": 2}, False, 30, 2),
    ],
)
def test_alignment_flags_set_the_as_shipped_profile(
    flavor: str, flags: dict[str, Any], delayer: bool, passes: int, interval: int
) -> None:
    from gateway.cli.engine_options import engine_model_config

    config = engine_model_config("as-shipped", flavor, 8, None, **flags)
    assert (config.enable_prefill_delayer, config.prefill_delayer_max_delay_passes) == (delayer, passes)
    assert config.prefill_schedule_interval == interval
    assert config.step_composition == flavor  # the rest of the profile is the engine's


@pytest.mark.parametrize(
    ("profile", "flavor", "flags", "message"),
    [
        ("idealised", "sglang", {"enable_prefill_delayer": True}, "as-shipped only"),
        ("as-shipped", "vllm", {"enable_prefill_delayer": True}, "not vllm flags"),
        ("as-shipped", "sglang", {"prefill_schedule_interval": 2}, "not sglang flags"),
        ("as-shipped", "sglang", {"enable_prefill_delayer": True, "disable_overlap_schedule": True}, "overlap"),
    ],
)
def test_alignment_flags_that_the_engine_would_refuse(
    profile: str, flavor: str, flags: dict[str, Any], message: str
) -> None:
    import click

    from gateway.cli.engine_options import engine_model_config

    with pytest.raises(click.UsageError, match=message):
        engine_model_config(profile, flavor, 8, None, **flags)  # type: ignore[arg-type]
