"""Load view: scraped metrics reconciled with local accounting, time passed in."""

from __future__ import annotations

import pytest

from gateway.load.view import LoadView
from gateway.scheduling.baselines import make_immediate_policy
from gateway.types import RankKey, RankMetrics
from tests.helpers import make_view, req

E0 = RankKey("e", 0)
E1 = RankKey("e", 1)


def loads(v: LoadView, now: float) -> dict[str, tuple[float, float, float, float]]:
    return {str(r.key): (r.waiting, r.running, r.queued_prefill_tokens, r.kv_tokens) for r in v.snapshot(now)}


def test_local_accounting_follows_a_request_lifecycle():
    v = make_view()
    v.on_dispatch("a", E0, 1000, 0.0, stream=True)
    assert loads(v, 0.0)["e/0"] == (1, 0, 1000, 1000)
    v.on_first_token("a", 0.5)
    v.on_tokens("a", 9)
    assert loads(v, 0.5)["e/0"] == (0, 1, 0, 1009)
    v.on_finish("a", 1.0)
    assert loads(v, 1.0)["e/0"] == (0, 0, 0, 0)
    assert v.inflight_count() == 0


def test_finish_before_first_token_releases_queued_prefill():
    v = make_view()
    v.on_dispatch("a", E1, 700, 0.0, stream=True)
    v.on_finish("a", 0.1)
    v.on_finish("a", 0.2)  # twice is harmless
    v.on_first_token("a", 0.3)  # late events for finished requests are ignored
    assert loads(v, 0.3)["e/1"] == (0, 0, 0, 0)


def test_burst_between_scrapes_does_not_herd():
    """A stale-looking idle scrape must not make every request of a burst pick the same rank."""
    v = make_view(dp_size=4)
    v.on_scrape("e", {i: RankMetrics() for i in range(4)}, 0.0)
    policy = make_immediate_policy("shortest_queue")
    chosen = []
    for i in range(8):
        key = policy.choose(req(f"r{i}", 100), v.snapshot(0.1))
        assert key is not None
        v.on_dispatch(f"r{i}", key, 100, 0.1, stream=True)
        chosen.append(key.rank)
    assert sorted(chosen) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_scrape_adds_other_clients_load_and_deltas_restart_at_each_scrape():
    v = make_view()
    v.on_dispatch("a", E0, 100, 0.0, stream=True)
    # the engine also runs 5 requests from elsewhere and has 2 waiting, ours among them
    v.on_scrape("e", {0: RankMetrics(running=5, waiting=2, kv_usage=0.4), 1: RankMetrics()}, 0.5)
    assert loads(v, 0.5)["e/0"][:2] == (2, 5)
    v.on_dispatch("b", E0, 100, 0.6, stream=True)
    v.on_first_token("a", 0.7)
    snap = {str(r.key): r for r in v.snapshot(0.8)}
    assert (snap["e/0"].waiting, snap["e/0"].running, snap["e/0"].kv_usage) == (2, 6, 0.4)
    v.on_finish("a", 0.9)
    assert loads(v, 0.9)["e/0"][:2] == (2, 5)


def test_lagging_scrape_never_hides_what_the_gateway_has_in_flight():
    v = make_view()
    for i in range(3):
        v.on_dispatch(f"r{i}", E1, 100, 0.0, stream=True)
    v.on_scrape("e", {0: RankMetrics(), 1: RankMetrics()}, 0.01)  # the engine has not seen them yet
    assert loads(v, 0.02)["e/1"][0] == 3


def test_stale_or_failing_scrapes_fall_back_to_local_accounting():
    v = make_view(stale_after_s=3.0)
    v.on_scrape("e", {0: RankMetrics(running=40, waiting=10, kv_usage=0.9)}, 0.0)
    assert loads(v, 2.0)["e/0"][:2] == (10, 40)
    v.on_scrape_failure("e", 2.5)
    assert not v.engine_reachable("e")
    assert loads(v, 2.9)["e/0"][:2] == (10, 40)  # the last good scrape is still fresh
    snap = {str(r.key): r for r in v.snapshot(3.5)}
    assert (snap["e/0"].waiting, snap["e/0"].running, snap["e/0"].kv_usage) == (0, 0, None)
    v.on_scrape("e", {}, 4.0)
    assert v.engine_reachable("e") and v.scrape_fresh("e", 4.0)


def test_non_streamed_request_counts_as_prefill_until_its_estimate():
    v = make_view()
    v.on_dispatch("a", E0, 500, 10.0, stream=False)
    assert loads(v, 10.9)["e/0"][:3] == (1, 0, 500)
    assert loads(v, 11.0)["e/0"][:3] == (0, 1, 0)
    v.on_finish("a", 12.0)
    assert loads(v, 12.0)["e/0"] == (0, 0, 0, 0)


def test_a_long_non_streamed_prompt_counts_as_prefill_for_every_chunk_it_spans():
    v = make_view()  # budgets of 8192 tokens, 1 s per chunk
    v.on_dispatch("long", E0, 100_000, 10.0, stream=False)  # 13 chunks
    assert loads(v, 22.9)["e/0"][:3] == (1, 0, 100_000)
    assert loads(v, 23.0)["e/0"][:3] == (0, 1, 0)


def test_bad_events_raise():
    v = make_view()
    v.on_dispatch("a", E0, 1, 0.0, stream=True)
    with pytest.raises(ValueError):
        v.on_dispatch("a", E1, 1, 0.0, stream=True)
    with pytest.raises(KeyError):
        v.on_dispatch("b", RankKey("e", 9), 1, 0.0, stream=True)
    with pytest.raises(KeyError):
        v.on_scrape("nope", {}, 0.0)


def test_usable_comes_from_the_function_given_at_construction():
    v = make_view(usable=lambda key, now: key.rank == 1)
    assert [r.usable for r in v.snapshot(0.0)] == [False, True]
    assert all(r.usable for r in make_view().snapshot(0.0))


def test_without_state_sync_the_snapshot_stays_as_at_the_last_scrape():
    v = make_view(state_sync=False)
    v.on_dispatch("before", E0, 500, 0.0, stream=True)
    assert loads(v, 0.0)["e/0"] == (1, 0, 500, 500), "before any scrape: the live local accounting"
    v.on_scrape("e", {0: RankMetrics(running=2, waiting=1, kv_usage=0.1), 1: RankMetrics(0, 0, 0.0)}, 1.0)
    v.on_dispatch("after", E0, 700, 1.1, stream=True)
    v.on_dispatch("other", E1, 300, 1.1, stream=True)
    assert loads(v, 1.2) == {"e/0": (1, 2, 500, 500), "e/1": (0, 0, 0, 0)}, "frozen at the scrape"
    v.on_scrape("e", {0: RankMetrics(2, 2, 0.1), 1: RankMetrics(0, 1, 0.0)}, 1.5)
    assert loads(v, 1.6) == {"e/0": (2, 2, 1200, 1200), "e/1": (1, 0, 300, 300)}


def test_a_rank_decoding_with_nothing_queued_makes_the_next_step_end_with_tokens():
    view = make_view("e", dp_size=2, stale_after_s=1e9)
    assert not view.decodes_next_step("e")
    view.on_dispatch("r0", RankKey("e", 0), 100, 0.0, stream=True)
    view.on_dispatch("r1", RankKey("e", 1), 100, 0.0, stream=True)
    view.on_first_token("r0", 0.1)
    assert view.decodes_next_step("e")  # rank 0 decodes r0 next step
    view.on_dispatch("r2", RankKey("e", 0), 100, 0.1, stream=True)
    assert not view.decodes_next_step("e")  # rank 0 prefills r2 instead (SGLang: prefill or decode per rank)
    view.on_first_token("r2", 0.2)
    assert view.rank_of("r2") == RankKey("e", 0) and view.rank_of("nope") is None
    view.on_finish("r0", 0.3)
    view.on_finish("r2", 0.3)
    assert not view.decodes_next_step("e")


def test_a_request_the_engine_already_counts_as_running_counts_twice_until_the_next_scrape_by_default():
    v = make_view()
    v.on_dispatch("a", E0, 100, 0.0, stream=True)
    v.on_scrape("e", {0: RankMetrics(running=1, waiting=0), 1: RankMetrics()}, 0.5)
    v.on_first_token("a", 0.6)
    v.on_finish("a", 0.7)
    assert loads(v, 0.7)["e/0"][:2] == (0, 1)


def test_a_request_the_engine_already_counts_as_running_is_not_counted_again_at_its_first_token():
    v = make_view(running_before_first_token=True)
    v.on_dispatch("a", E0, 100, 0.0, stream=True)
    # the engine runs it (prefilling) before its first token reaches the gateway: running 1, nothing waiting
    v.on_scrape("e", {0: RankMetrics(running=1, waiting=0), 1: RankMetrics()}, 0.5)
    v.on_first_token("a", 0.6)
    assert loads(v, 0.6)["e/0"][:2] == (0, 1)
    v.on_finish("a", 0.7)
    assert loads(v, 0.7)["e/0"][:2] == (0, 0)  # idle again at once, not at the next scrape


def test_of_the_requests_unstarted_at_a_scrape_only_as_many_as_the_engine_counts_waiting_move_to_running():
    v = make_view(running_before_first_token=True)
    for name in ("a", "b", "c"):
        v.on_dispatch(name, E0, 100, 0.0, stream=True)
    v.on_scrape("e", {0: RankMetrics(running=2, waiting=1), 1: RankMetrics()}, 0.5)  # two prefilling, one queued
    for name in ("a", "b", "c"):
        v.on_first_token(name, 0.6)
    assert loads(v, 0.6)["e/0"][:2] == (0, 3)
    v.on_finish("a", 0.7)
    v.on_finish("b", 0.7)
    assert loads(v, 0.7)["e/0"][:2] == (0, 1)


def test_a_request_counted_running_that_ends_before_its_first_token_leaves_the_running_figure():
    v = make_view(running_before_first_token=True)
    v.on_dispatch("a", E0, 100, 0.0, stream=True)
    v.on_scrape("e", {0: RankMetrics(running=1, waiting=0), 1: RankMetrics()}, 0.5)
    v.on_finish("a", 0.6)  # aborted while prefilling
    assert loads(v, 0.6)["e/0"][:2] == (0, 0)
