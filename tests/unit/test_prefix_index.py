"""The gateway's prefix index per DP rank, and what placements and the load view make of it."""

from __future__ import annotations

import pytest

from gateway.config import PhaseAwareConfig, PrefixCacheConfig, WindowConfig
from gateway.scheduling.prefix_index import PrefixIndex
from gateway.scheduling.scheduler import Scheduler
from gateway.types import RankKey
from tests.helpers import make_view, req

A0, A1, B0 = RankKey("a", 0), RankKey("a", 1), RankKey("b", 0)


def test_match_counts_the_leading_blocks_each_rank_holds():
    """Blocks are chained hashes: an id stands for its whole prefix, so it never recurs at another position."""
    index = PrefixIndex(10 * 512)
    index.insert(A0, (1, 2, 3, 4))
    index.insert(A1, (1, 2, 9))
    index.insert(B0, (7, 8))
    assert index.match((1, 2, 3, 5)) == {A0: 3, A1: 2}
    assert index.match((1, 2, 9, 10)) == {A0: 2, A1: 3}
    assert index.match((7, 9)) == {B0: 1}
    assert index.match((5, 6)) == {}
    assert index.match(()) == {}
    assert index.cached_tokens(3, 5000) == 1536
    assert index.cached_tokens(3, 1536) == 1535  # the last token is always computed


def test_a_rank_forgets_its_least_recently_used_blocks_beyond_its_capacity():
    index = PrefixIndex(4 * 512)
    index.insert(A0, (1, 2))
    index.insert(A0, (3, 4))
    index.insert(A0, (1, 2))  # touched again: (3, 4) is now the oldest
    index.insert(A0, (5,))
    assert index.blocks(A0) == 4
    assert index.match((3, 4)) == {}
    assert index.match((1, 2)) == {A0: 2}
    index.insert(A1, (1, 2))
    index.forget("a")
    assert index.blocks(A0) == index.blocks(A1) == 0 and index.match((1,)) == {}


def test_bad_capacity_is_refused():
    with pytest.raises(ValueError):
        PrefixIndex(100)


def test_dispatches_queue_only_what_the_rank_must_prefill_for_every_policy():
    """A follow-up turn sent where its conversation ran queues only its new tokens; elsewhere, all of them."""
    view = make_view("a", dp_size=2, stale_after_s=1e9)
    scheduler = Scheduler(
        "round_robin",
        view,
        window=WindowConfig(),
        allocator=PhaseAwareConfig(),
        decode=None,
        prefix_cache=PrefixCacheConfig(capacity_tokens=100_000),
    )
    first = scheduler.submit(req("t1", 2048, blocks=(1, 2, 3, 4)), 0.0)
    second = scheduler.submit(req("t2", 3000, blocks=(1, 2, 3, 4, 5, 6)), 0.0)
    third = scheduler.submit(req("t3", 3000, blocks=(1, 2, 3, 4, 5, 6)), 0.0)
    assert (first, second, third) == (A0, A1, A0)  # round robin ignores the index, but the view does not
    queued = {key: tokens for key, tokens, _ in view.queued_prefill_tokens("a")}
    assert queued[A0] == 2048 + (3000 - 4 * 512)
    assert queued[A1] == 3000
