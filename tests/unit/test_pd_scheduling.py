"""Scheduling per phase for P/D models: prompts on prefill ranks only, each request's decode rank chosen by the
decode allocation (or a per-leg baseline), both legs recorded in the load view."""

from __future__ import annotations

import pytest

from gateway.config import DecodeConfig, PdConfig, PhaseAwareConfig, WindowConfig
from gateway.engines.sglang import SglangAdapter
from gateway.load.view import DECODE_ROLES, PREFILL_ROLES, EngineSpec, LoadView
from gateway.scheduling.decode import DecodeRanker
from gateway.scheduling.pd import DecodeAllocation, FollowBootstrapRoom
from gateway.scheduling.scheduler import NoServingRankError, Scheduler
from gateway.types import RankKey
from tests.helpers import MODEL, req

OTHER = "other-model"


def pd_view(prefill_dp: int = 2, decode_dp: int = 4) -> LoadView:
    """A prefill engine ``p`` and a decode engine ``d`` serving :data:`MODEL` P/D, and a mixed engine ``m`` serving
    :data:`OTHER`."""
    specs = [
        EngineSpec("m", 2, frozenset({OTHER}), 8192),
        EngineSpec("p", prefill_dp, frozenset({MODEL}), 8192, "prefill"),
        EngineSpec("d", decode_dp, frozenset({MODEL}), 8192, "decode"),
    ]
    return LoadView(specs, stale_after_s=3.0)


def scheduler(view: LoadView, policy: str = "sbs", pd: PdConfig | None = None, **window: object) -> Scheduler:
    return Scheduler(
        policy,
        view,
        window=WindowConfig(hold_min_arrivals=None, close_when_idle=False, **window),  # type: ignore[arg-type]
        allocator=PhaseAwareConfig(),
        decode=DecodeConfig(),
        seed=3,
        pd=pd,
    )


def place_all(s: Scheduler, n: int, prompt: int = 1000, model: str = MODEL) -> list[tuple[str, RankKey]]:
    """Submit ``n`` requests at t=0 and poll until the window placed them; ``(request id, rank)`` in order."""
    placed = []
    for i in range(n):
        key = s.submit(req(f"r{i}", prompt, model=model), 0.0)
        if key is not None:
            placed.append((f"r{i}", key))
    t = 0.0
    while len(placed) < n and t < 5.0:
        t += 0.01
        outcome = s.poll(t)
        if outcome is not None:
            placed += [(r.request_id, key) for r, key in outcome.assigned]
    return placed


def test_role_filters_the_snapshot() -> None:
    view = pd_view()
    assert {r.key.engine for r in view.snapshot(0.0, PREFILL_ROLES)} == {"m", "p"}
    assert {r.key.engine for r in view.snapshot(0.0, DECODE_ROLES)} == {"d"}
    assert len(view.snapshot(0.0)) == 2 + 2 + 4
    assert view.pd_models == frozenset({MODEL})
    assert view.role("d") == "decode"


def test_sbs_places_prompts_on_prefill_ranks_and_each_request_on_a_decode_rank() -> None:
    view = pd_view()
    s = scheduler(view)
    placed = place_all(s, 12)
    assert len(placed) == 12
    assert {key.engine for _, key in placed} == {"p"}
    assert {key.rank for _, key in placed} == {0, 1}
    decode = [view.decode_rank_of(request_id) for request_id, _ in placed]
    assert all(key is not None and key.engine == "d" for key in decode)
    assert sorted(key.rank for key in decode if key is not None) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_mixed_models_never_reach_prefill_or_decode_ranks() -> None:
    view = pd_view()
    placed = place_all(scheduler(view), 6, model=OTHER)
    assert {key.engine for _, key in placed} == {"m"}
    assert all(view.decode_rank_of(request_id) is None for request_id, _ in placed)


def test_decode_rank_is_the_decode_rankers_choice() -> None:
    """Four decode ranks, one an outlier on requests, one holding long contexts: the ranker's best goes first."""
    view = pd_view()
    for i in range(9):
        view.on_dispatch_decode(f"busy{i}", RankKey("d", 0), 100, 0.0)
    view.on_dispatch_decode("long", RankKey("d", 1), 60_000, 0.0)
    decode = view.snapshot(0.0, DECODE_ROLES)
    ranker = DecodeRanker(decode, iqr_k=1.5, bucket=4)
    expected = min((r.key for r in decode), key=ranker.key)
    assert expected == RankKey("d", 2)
    assert DecodeAllocation(DecodeConfig()).choose(req("x", 10), decode) == expected
    s = scheduler(view, "sbs", PdConfig(prefill_policy="round_robin"))  # decode: sbs's allocation, as policy
    key = s.submit(req("x", 10), 0.0)
    assert key is not None and key.engine == "p"
    assert view.decode_rank_of("x") == expected


def test_decode_allocation_without_settings_takes_fewest_requests_then_kv() -> None:
    view = pd_view()
    view.on_dispatch_decode("a", RankKey("d", 0), 10, 0.0)
    view.on_dispatch_decode("b", RankKey("d", 1), 5000, 0.0)
    view.on_dispatch_decode("c", RankKey("d", 2), 10, 0.0)
    view.on_dispatch_decode("d", RankKey("d", 3), 10, 0.0)
    view.on_dispatch_decode("e", RankKey("d", 3), 10, 0.0)
    choice = DecodeAllocation(None).choose(req("x", 10), view.snapshot(0.0, DECODE_ROLES))
    assert choice == RankKey("d", 0)


def test_the_load_view_holds_the_prompt_until_the_first_token_and_the_request_until_it_ends() -> None:
    view = pd_view()
    s = scheduler(view, "round_robin")
    prefill = s.submit(req("x", 3000), 0.0)
    decode = view.decode_rank_of("x")
    assert prefill is not None and decode is not None

    def load(key: RankKey) -> tuple[float, float, float, float]:
        (r,) = [r for r in view.snapshot(1.0) if r.key == key]
        return r.waiting, r.running, r.queued_prefill_tokens, r.kv_tokens

    assert load(prefill) == (1, 0, 3000, 3000)
    assert load(decode) == (0, 1, 0, 3000)  # in transfer or pre-allocation: running already
    s.on_first_token("x", "d", 1.0)
    assert load(prefill) == (0, 0, 0, 0)
    assert load(decode) == (0, 1, 0, 3000)
    s.on_tokens("x", "d", 5, 1.1)
    assert load(decode) == (0, 1, 0, 3005)
    assert view.rank_of("x") == decode
    s.on_finish("x", 2.0)
    assert load(decode) == (0, 0, 0, 0)
    assert view.inflight_count() == 0 and view.decode_rank_of("x") is None


def test_a_request_that_ends_before_its_first_token_leaves_both_ranks() -> None:
    view = pd_view()
    s = scheduler(view, "round_robin")
    s.submit(req("x", 3000), 0.0)
    assert view.inflight_count() == 1
    s.on_finish("x", 0.5)
    assert all((r.waiting, r.running, r.queued_prefill_tokens, r.kv_tokens) == (0, 0, 0, 0) for r in view.snapshot(1.0))


def test_decode_legs_count_as_running_on_top_of_a_scrape() -> None:
    from gateway.types import RankMetrics

    view = pd_view()
    view.on_scrape("d", {r: RankMetrics(running=2) for r in range(4)}, 0.0)
    view.on_dispatch_decode("x", RankKey("d", 1), 100, 0.1)
    running = {r.key.rank: r.running for r in view.snapshot(0.2, DECODE_ROLES)}
    assert running == {0: 2, 1: 3, 2: 2, 3: 2}
    view.on_finish("x", 0.3)
    assert {r.key.rank: r.running for r in view.snapshot(0.4, DECODE_ROLES)}[1] == 2


@pytest.mark.parametrize("policy", ["sbs", "least_load"])
def test_per_leg_baselines(policy: str) -> None:
    """``pd.prefill_policy`` and ``pd.decode_policy`` place each leg at once, whatever ``policy`` is."""
    view = pd_view(prefill_dp=3, decode_dp=2)
    s = scheduler(view, policy, PdConfig(prefill_policy="round_robin", decode_policy="round_robin"))
    keys = [s.submit(req(f"r{i}", 100), 0.0) for i in range(6)]
    assert [k.rank for k in keys if k is not None] == [0, 1, 2, 0, 1, 2]
    assert [view.decode_rank_of(f"r{i}") for i in range(6)] == [RankKey("d", i % 2) for i in range(6)]


def test_immediate_policy_places_both_legs_with_its_own_rule_by_default() -> None:
    view = pd_view(prefill_dp=2, decode_dp=3)
    s = scheduler(view, "round_robin")
    keys = [s.submit(req(f"r{i}", 100), 0.0) for i in range(6)]
    assert [k.rank for k in keys if k is not None] == [0, 1, 0, 1, 0, 1]
    assert [view.decode_rank_of(f"r{i}") for i in range(6)] == [RankKey("d", i % 3) for i in range(6)]


def test_follow_bootstrap_room_is_uniform_and_seeded() -> None:
    view = pd_view(prefill_dp=4)
    ranks = view.snapshot(0.0, PREFILL_ROLES)
    draws = [FollowBootstrapRoom(7).choose(req("x", 10), ranks) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same first draw
    policy = FollowBootstrapRoom(7)
    counts = {i: 0 for i in range(4)}
    for n in range(4000):
        key = policy.choose(req(f"r{n}", 10), ranks)
        assert key is not None and key.engine == "p"
        counts[key.rank] += 1
    assert all(900 < c < 1100 for c in counts.values())
    s = scheduler(view, "sbs", PdConfig(prefill_policy="follow_bootstrap_room"))
    assert s.submit(req("y", 10), 0.0) is not None  # placed at once, not windowed


def test_retry_avoids_the_failed_ranks_of_both_legs() -> None:
    view = pd_view(prefill_dp=2, decode_dp=2)
    s = scheduler(view, "round_robin")
    first = s.submit(req("x", 100), 0.0)
    decode = view.decode_rank_of("x")
    assert first is not None and decode is not None
    s.on_finish("x", 0.1)
    again = s.place_retry(req("x", 100), {first, decode}, 0.2)
    assert again.engine == "p" and again != first
    assert view.decode_rank_of("x") == RankKey("d", 1 - decode.rank)


def test_no_decode_rank_means_no_placement() -> None:
    specs = [
        EngineSpec("p", 2, frozenset({MODEL}), 8192, "prefill"),
        EngineSpec("d", 1, frozenset({MODEL}), 8192, "decode"),
    ]
    view = LoadView(specs, stale_after_s=3.0, usable=lambda key, now: key.engine != "d")
    s = scheduler(view, "round_robin")
    with pytest.raises(NoServingRankError):
        s.submit(req("x", 100), 0.0)
    assert view.inflight_count() == 0
    windowed = scheduler(view)
    windowed.submit(req("y", 100), 0.0)
    outcome = windowed.poll(1.0)
    assert outcome is not None and [r.request_id for r in outcome.unplaceable] == ["y"]
    assert view.inflight_count() == 0


def test_sglang_decode_queues_count_as_running() -> None:
    text = (
        "# TYPE sglang:num_running_reqs gauge\n"
        'sglang:num_running_reqs{engine_type="decode",dp_rank="0",tp_rank="0"} 5\n'
        'sglang:num_running_reqs{engine_type="decode",dp_rank="1",tp_rank="0"} 1\n'
        "# TYPE sglang:num_decode_prealloc_queue_reqs gauge\n"
        'sglang:num_decode_prealloc_queue_reqs{engine_type="decode",dp_rank="0",tp_rank="0"} 2\n'
        "# TYPE sglang:num_decode_transfer_queue_reqs gauge\n"
        'sglang:num_decode_transfer_queue_reqs{engine_type="decode",dp_rank="0",tp_rank="0"} 3\n'
        'sglang:num_decode_transfer_queue_reqs{engine_type="decode",dp_rank="1",tp_rank="0"} 0\n'
    )
    ranks = SglangAdapter().parse_metrics(text)
    assert ranks[0].running == 10 and ranks[1].running == 1


async def test_the_dispatchers_placement_carries_both_ranks() -> None:
    from gateway.config import EngineConfig, Settings
    from gateway.dispatch import Dispatcher
    from gateway.telemetry import GatewayMetrics

    common = {"flavor": "sglang", "dp_size": 2, "models": [MODEL]}
    settings = Settings(
        policy="round_robin",
        engines=[
            EngineConfig(name="p", url="http://p:1", role="prefill", **common),  # type: ignore[arg-type]
            EngineConfig(name="d", url="http://d:1", role="decode", **common),  # type: ignore[arg-type]
        ],
    )
    view = LoadView(
        [EngineSpec(e.name, e.dp_size, frozenset(e.models), 8192, e.role) for e in settings.engines],
        stale_after_s=3.0,
    )
    dispatcher = Dispatcher(settings, view, GatewayMetrics(), clock=lambda: 0.0)
    first = await dispatcher.acquire(req("a", 100))
    second = await dispatcher.acquire(req("b", 100))
    assert (first.rank, first.decode_rank) == (RankKey("p", 0), RankKey("d", 0))
    assert (second.rank, second.decode_rank) == (RankKey("p", 1), RankKey("d", 1))
    dispatcher.finish("a")  # the relay releases a failed attempt before placing the retry
    again = dispatcher.retry_placement(req("a", 100), {RankKey("d", 0)})
    assert again.decode_rank == RankKey("d", 1)
