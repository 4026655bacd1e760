"""Queued prefill tokens the engine reports (SGLang ``/v1/loads``) reconciled with the gateway's own accounting."""

from __future__ import annotations

import json

import pytest

from gateway.engines.base import MetricsParseError
from gateway.engines.sglang import SglangAdapter
from gateway.types import RankMetrics
from tests.helpers import make_view


def queued(view, now: float = 0.0) -> dict[int, float]:
    return {load.key.rank: load.queued_prefill_tokens for load in view.snapshot(now)}


def test_the_engines_figure_replaces_the_local_estimate_at_a_scrape():
    view = make_view("e", dp_size=2, stale_after_s=5)
    view.on_dispatch("a", view.keys[0], 2000, 0.0, stream=True)
    assert queued(view) == {0: 2000, 1: 0}
    # the engine counts 5,000 tokens waiting on rank 0 (its tokenizer, other clients' requests) and 300 on rank 1
    view.on_scrape("e", {0: RankMetrics(waiting=1, queued_prefill_tokens=5000), 1: RankMetrics()}, 1.0)
    assert queued(view, 1.0) == {0: 5000, 1: 0}


def test_dispatches_since_the_scrape_count_on_top_and_leaving_requests_take_their_share_off():
    view = make_view("e", dp_size=1, stale_after_s=5)
    view.on_dispatch("a", view.keys[0], 1000, 0.0, stream=True)
    view.on_dispatch("b", view.keys[0], 3000, 0.0, stream=True)
    # the engine counts 2,000 uncached tokens where the gateway estimated 4,000 (prefix-cache hits)
    view.on_scrape("e", {0: RankMetrics(waiting=2, queued_prefill_tokens=2000)}, 1.0)
    view.on_dispatch("c", view.keys[0], 800, 1.1, stream=True)
    assert queued(view, 1.2) == {0: 2800}
    view.on_first_token("a", 1.3)  # a quarter of the estimated tokens queued at the scrape left
    assert queued(view, 1.3) == {0: 2000 * 3000 / 4000 + 800}
    view.on_first_token("c", 1.4)  # dispatched since the scrape: its own estimate comes off
    assert queued(view, 1.4) == {0: 1500}
    view.on_finish("b", 1.5)  # finished without starting (client gone): the rest of the engine's figure goes
    assert queued(view, 1.5) == {0: 0}


def test_work_the_gateway_did_not_send_stays_until_the_next_scrape():
    view = make_view("e", dp_size=1, stale_after_s=5)
    view.on_scrape("e", {0: RankMetrics(waiting=3, queued_prefill_tokens=5000)}, 1.0)  # another gateway's requests
    view.on_dispatch("a", view.keys[0], 500, 1.1, stream=True)
    assert queued(view, 1.2) == {0: 5500}
    view.on_first_token("a", 1.3)
    assert queued(view, 1.3) == {0: 5000}
    view.on_scrape("e", {0: RankMetrics(queued_prefill_tokens=0)}, 2.0)
    assert queued(view, 2.0) == {0: 0}


def test_a_request_sent_after_the_figure_was_read_counts_on_top_of_it():
    view = make_view("e", dp_size=1, stale_after_s=5)
    view.on_dispatch("before", view.keys[0], 1000, 0.0, stream=True)
    view.on_dispatch("in transit", view.keys[0], 30_000, 0.96, stream=True)  # after the engine was asked at 0.95
    view.on_scrape("e", {0: RankMetrics(queued_prefill_tokens=1200, queued_read_at=0.95)}, 1.0)
    assert queued(view, 1.0) == {0: 31_200}
    view.on_first_token("before", 1.1)
    assert queued(view, 1.1) == {0: 30_000}  # the long prompt is not lost when the other one starts


def test_a_stale_scrape_or_an_engine_without_the_figure_leaves_local_accounting():
    view = make_view("e", dp_size=2, stale_after_s=5)
    view.on_dispatch("a", view.keys[0], 2000, 0.0, stream=True)
    view.on_scrape("e", {0: RankMetrics(waiting=1, queued_prefill_tokens=9000), 1: RankMetrics(waiting=3)}, 1.0)
    assert queued(view, 1.0) == {0: 9000, 1: 0}
    assert queued(view, 7.0) == {0: 2000, 1: 0}  # stale: the engine's figure is no longer believed


LOADS = {
    "timestamp": "2026-12-07T00:00:00+00:00",
    "version": "0.5.23",
    "loads": [
        {"dp_rank": 0, "num_waiting_reqs": 2, "num_waiting_uncached_tokens": 4096},
        {"dp_rank": 1, "num_waiting_uncached_tokens": 0},
        {"dp_rank": 2, "num_waiting_uncached_tokens": -1},
        {"dp_rank": 3, "num_waiting_uncached_tokens": True},
        {"dp_rank": "4", "num_waiting_uncached_tokens": 5},
        {"dp_rank": 5},
        "junk",
    ],
}


def test_sglang_loads_are_read_per_rank_and_junk_is_skipped():
    assert SglangAdapter().parse_loads(json.dumps(LOADS)) == {
        0: {"queued_prefill_tokens": 4096.0},
        1: {"queued_prefill_tokens": 0.0},
    }
    assert SglangAdapter().parse_loads('{"loads": [{"dp_rank": 0, "num_waiting_uncached_tokens": NaN}]}') == {}


@pytest.mark.parametrize("body", ["not json", "[]", '{"loads": 3}', "{}"])
def test_an_unreadable_loads_body_is_a_parse_error(body):
    with pytest.raises(MetricsParseError):
        SglangAdapter().parse_loads(body)
