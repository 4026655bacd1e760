"""The batch window as a state machine, time passed in."""

from __future__ import annotations

import pytest

from gateway.scheduling.window import BatchWindow
from tests.helpers import req


def window(**kw) -> BatchWindow:
    args = dict(min_interval_s=0.01, max_interval_s=0.2, step_fraction=0.5, initial_step_s=0.1)
    args.update(kw)
    return BatchWindow(**args)


@pytest.mark.parametrize(
    ("step_s", "interval_s"),
    [(0.1, 0.05), (0.001, 0.01), (10.0, 0.2), (0.3, 0.15), (0.0, 0.05), (float("nan"), 0.05)],
)
def test_interval_tracks_step_time_within_bounds(step_s, interval_s):
    w = window()
    w.observe_step_time(step_s)
    assert w.interval_s == pytest.approx(interval_s)


@pytest.mark.parametrize(("now", "tick"), [(0.0, 0.05), (0.01, 0.05), (0.05, 0.10), (0.37, 0.40)])
def test_ticks_lie_on_a_grid(now, tick):
    assert window().next_tick(now) == pytest.approx(tick)


def test_next_tick_is_strictly_after_now_despite_rounding():
    w = window()
    w.observe_step_time(0.08)  # interval 0.04: k * 0.04 is rarely exact in binary
    for i in range(1, 5000):
        now = w.next_tick(i * 0.04)
        assert w.next_tick(now) > now


def test_request_waits_for_the_next_tick_then_batch_is_released_in_arrival_order():
    w = window()
    w.add(req("a", 100, 0.011), now=0.011)
    w.add(req("b", 200, 0.02), now=0.02)
    assert w.deadline == pytest.approx(0.05)
    assert not w.due(0.049, free_capacity_tokens=10_000)
    assert w.due(0.05, free_capacity_tokens=10_000)
    assert [r.request_id for r in w.take(0.05)] == ["a", "b"]
    assert len(w) == 0 and w.buffered_tokens == 0 and w.deadline is None


def test_window_closes_early_when_buffered_tokens_fill_free_capacity():
    w = window()
    w.add(req("a", 3000), now=0.0)
    assert not w.due(0.001, free_capacity_tokens=5000)
    w.add(req("b", 2500), now=0.002)
    assert w.buffered_tokens == 5500
    assert w.due(0.002, free_capacity_tokens=5000)
    assert not w.due(0.002, free_capacity_tokens=0)  # nothing free: wait for the tick


def test_nothing_placed_disarms_early_close_until_capacity_is_freed():
    w = window()
    w.add(req("a", 3000), now=0.0)
    batch = w.take(0.001)
    w.requeue(batch, 0.001, placed_any=False)
    assert not w.due(0.002, free_capacity_tokens=100)
    assert w.due(w.deadline, free_capacity_tokens=100)  # the tick still closes it
    w.notify_capacity_freed()
    assert w.due(0.002, free_capacity_tokens=100)


def test_requeued_requests_go_before_newer_arrivals():
    w = window()
    w.add(req("old", 10, 0.0), now=0.0)
    batch = w.take(0.05)
    w.add(req("new", 10, 0.06), now=0.06)
    w.requeue(batch, 0.07, placed_any=True)
    assert [r.request_id for r in w.take(0.1)] == ["old", "new"]
    assert batch[0].deferrals == 1


def test_remove_drops_a_request_and_its_tokens():
    w = window()
    w.add(req("a", 10), now=0.0)
    w.add(req("b", 20), now=0.0)
    assert w.remove("a") is not None
    assert w.remove("a") is None
    assert w.buffered_tokens == 20 and "b" in w and "a" not in w
    with pytest.raises(ValueError, match="already in the window"):
        w.add(req("b", 1), now=0.0)


def test_rejects_inverted_bounds():
    with pytest.raises(ValueError):
        window(min_interval_s=0.5, max_interval_s=0.1)


def test_align_moves_the_open_windows_deadline_and_none_restores_the_grid_tick():
    w = window()
    w.align(0.5)  # empty: nothing to align
    assert w.deadline is None and w.opened_s is None
    w.add(req("a", 100, 0.011), now=0.011)
    assert w.opened_s == 0.011
    w.align(0.03)
    assert w.deadline == 0.03 and w.due(0.03, free_capacity_tokens=10_000)
    w.align(None)
    assert w.deadline == pytest.approx(0.05)
    w.take(0.05)
    assert w.opened_s is None and w.deadline is None


def test_expected_arrivals_follow_the_mean_gap_between_arrivals():
    w = window()  # interval 0.05 s
    assert w.expected_arrivals() == 0.0  # nothing seen
    w.add(req("a", 10), 0.0)
    assert w.expected_arrivals() == 0.0  # one arrival: no gap yet
    w.add(req("b", 10), 0.1)
    assert w.expected_arrivals() == pytest.approx(0.5)  # one gap of 0.1 s
    w.add(req("c", 10), 0.1)
    assert w.expected_arrivals() == pytest.approx(0.05 / (0.1 * 0.95))  # a gap of 0 weighs 5%


def test_close_now_makes_the_window_due_and_align_cannot_undo_it():
    w = window()
    w.add(req("a", 10), 0.01)
    w.close_now(0.01)
    w.align(0.04)
    assert w.deadline == 0.01 and w.due(0.01, free_capacity_tokens=0)
    w.take(0.01)
    w.add(req("b", 10), 0.02)
    assert w.deadline == pytest.approx(0.05)  # a new window keeps its tick
