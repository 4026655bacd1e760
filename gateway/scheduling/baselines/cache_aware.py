"""``cache_aware``: the SGLang Model Gateway's default policy, approximate-tree mode, with ``--dp-aware``.

Source: smg 1.13.0 (the PyPI source distribution), ``model_gateway/src/policies/cache_aware.rs``
(``select_worker_with_text``, ``select_matched_candidate``, ``select_final_from_affinity``,
``over_count_pressure_gate``, ``absolute_margin``) and ``crates/kv_index/src/string_tree.rs``
(``evict_tenant_by_size``); defaults are the CLI's (``bindings/python/src/smg/router_args.py``), not the Rust
``Default``. With ``--dp-aware`` smg makes one worker per DP rank (``{url}@{rank}``), so here a worker is a rank.

The policy keeps an approximate tree of the prompts it routed to each rank (what the engines probably cache). For
each request, over the usable ranks serving its model, with ``mean`` their mean load:

1. Match the prompt against the tree: ``match_rate`` = matched share of the prompt.
2. A hit (``match_rate > cache_threshold``) with usable holders of the matched prefix: among the holders not over
   the spill gate, the least expected wait (:func:`~gateway.scheduling.baselines.least_load.least_expected_wait`,
   smg's ``least_load`` score). If every holder is over the gate, the request spills: the least expected wait
   among the ranks not over the gate (all ranks when none is under it).
3. A miss: the least expected wait over all ranks.
4. The prompt goes into the tree for the chosen rank (so a spilled hot prefix gains a second holder).

The spill gate: load above ``balance_rel_threshold * mean`` and above ``mean + margin``, with
``margin = min(balance_abs_threshold, max(4, ceil(2 * sqrt(mean))))`` (two standard deviations of a Poisson
count, at least 4 requests, at most the configured 64). Every ``eviction_interval_s`` the tree is cut back to
``max_tree_size`` characters, least recently used leaves first. Load is smg's router-side in-flight count; here
the rank's waiting + running requests from the load view. smg's fleet-wide fallback on KV pressure
(``balance_token_usage_threshold``, ``overload_token_usage_threshold``) is off by default (1.0), and its optional
``overlap_decay``, ``selection_temperature`` and ``selection_accounting_ttl_ms`` are 0 by default; none is
modelled. The warm-up slice applies to its event-driven mode only.

**Blocks, not characters.** smg's HTTP tree matches characters. Here the tree holds the prompt's 512-token blocks
(:attr:`~gateway.types.PendingRequest.prefix_blocks`, chained hashes, so a dict of block hash → holders is the
radix tree at block granularity): a prefix shared for part of a block counts as unshared, the match rate is
matched blocks over prompt blocks, and sizes are counted as 2,048 characters per block. A request without
blocks (an Azure trace) never matches. The simulated engines as shipped keep a prefix cache per rank, where the
affinity this policy keeps saves prefill; the idealised engine has none.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.scheduling.baselines.base import serving
from gateway.scheduling.baselines.indexed import LiveRanks, LoadOrder, LoadSum, PerModel
from gateway.scheduling.baselines.least_load import least_expected_wait, least_load_score, least_wait_tie
from gateway.types import PREFIX_BLOCK_CHARS, PendingRequest, RankKey, RankLoad

CACHE_THRESHOLD = 0.3
"""Minimum matched share of the prompt for affinity routing (``--cache-threshold``)."""

BALANCE_ABS_THRESHOLD = 64
"""Cap of the spill gate's absolute margin, requests above the mean load (``--balance-abs-threshold``)."""

MIN_ABSOLUTE_MARGIN = 4.0
"""Floor of the spill gate's absolute margin, requests (``MIN_ABSOLUTE_MARGIN``, ``cache_aware.rs``)."""

BALANCE_REL_THRESHOLD = 1.5
"""Spill gate, multiple of the mean load (``--balance-rel-threshold``)."""

EVICTION_INTERVAL_S = 60.0
"""Seconds between tree evictions (``--eviction-interval-secs``)."""

MAX_TREE_SIZE_CHARS = 2**26
"""Tree bound, characters summed over holders (``--max-tree-size``)."""


@dataclass(slots=True)
class _Node:
    depth: int
    holders: dict[RankKey, float] = field(default_factory=dict)  # rank -> last access (seconds)


class CacheAware:
    name = "cache_aware"

    def __init__(
        self,
        seed: int = 0,
        *,
        cache_threshold: float = CACHE_THRESHOLD,
        balance_abs_threshold: float = BALANCE_ABS_THRESHOLD,
        balance_rel_threshold: float = BALANCE_REL_THRESHOLD,
        eviction_interval_s: float = EVICTION_INTERVAL_S,
        max_tree_blocks: int = MAX_TREE_SIZE_CHARS // PREFIX_BLOCK_CHARS,
    ) -> None:
        self._rng = random.Random(seed)
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.eviction_interval_s = eviction_interval_s
        self.max_tree_blocks = max_tree_blocks
        self._tree: dict[int, _Node] = {}
        self._size = 0  # (block, holder) pairs
        self._next_eviction: float | None = None
        self._live = PerModel(
            lambda live, model: (
                LoadOrder(live, model, least_load_score),
                LoadSum(live, model, lambda r: r.queue_length),
            )
        )

    def choose(self, request: PendingRequest, ranks: Sequence[RankLoad]) -> RankKey | None:
        candidates = serving(request, ranks)
        if not candidates:
            return None
        now = request.arrival_s
        self._evict_if_due(now)
        mean = sum(r.queue_length for r in candidates) / len(candidates)
        blocks = request.prefix_blocks
        matched = 0
        while matched < len(blocks) and blocks[matched] in self._tree:
            matched += 1
        held: list[RankLoad] = []
        if blocks and matched / len(blocks) > self.cache_threshold:
            holders = self._tree[blocks[matched - 1]].holders
            held = [r for r in candidates if r.key in holders]
        if held:
            safe = [r for r in held if not self.over_gate(r.queue_length, mean)]
            if not safe:
                safe = [r for r in candidates if not self.over_gate(r.queue_length, mean)] or candidates
            chosen = least_expected_wait(safe, self._rng)
        else:
            chosen = least_expected_wait(candidates, self._rng)
        self._insert(blocks, chosen.key, now)
        return chosen.key

    def choose_live(self, request: PendingRequest, live: LiveRanks) -> RankKey | None:
        order, total = self._live.get(live, request.model)
        candidates = order.sync()
        total.sync()
        if not len(candidates):
            return None
        now = request.arrival_s
        self._evict_if_due(now)
        mean = total.total() / len(candidates)
        blocks = request.prefix_blocks
        matched = 0
        while matched < len(blocks) and blocks[matched] in self._tree:
            matched += 1
        held: list[int] = []
        if blocks and matched / len(blocks) > self.cache_threshold:
            index = candidates.index
            held = sorted(j for key in self._tree[blocks[matched - 1]].holders if (j := index.get(key)) is not None)
        chosen: RankLoad | None = None
        if held:
            safe = [r for r in map(candidates.load, held) if not self.over_gate(r.queue_length, mean)]
            if safe:
                chosen = least_expected_wait(safe, self._rng)
            else:
                j = least_wait_tie(
                    order.order, self._rng, lambda j: not self.over_gate(candidates.load(j).queue_length, mean)
                )
                chosen = candidates.load(j) if j is not None else None
        if chosen is None:
            j = least_wait_tie(order.order, self._rng)
            assert j is not None
            chosen = candidates.load(j)
        self._insert(blocks, chosen.key, now)
        return chosen.key

    def over_gate(self, load: float, mean: float) -> bool:
        """Whether a rank with ``load`` requests is over the spill gate at ``mean`` (module docstring)."""
        margin = min(self.balance_abs_threshold, max(MIN_ABSOLUTE_MARGIN, math.ceil(2.0 * math.sqrt(mean))))
        return load > mean * self.balance_rel_threshold and load > mean + margin

    def _insert(self, blocks: tuple[int, ...], key: RankKey, now: float) -> None:
        for depth, block in enumerate(blocks):
            node = self._tree.setdefault(block, _Node(depth))
            if key not in node.holders:
                self._size += 1
            node.holders[key] = now

    def _evict_if_due(self, now: float) -> None:
        """Cut the tree to ``max_tree_blocks`` (block, holder) pairs every ``eviction_interval_s``, the least
        recently used first and, among equally recent ones, the deepest (a leaf before its parent)."""
        if self._next_eviction is None:
            self._next_eviction = now + self.eviction_interval_s
        if now < self._next_eviction:
            return
        self._next_eviction = now + self.eviction_interval_s
        if self._size <= self.max_tree_blocks:
            return
        pairs = sorted(
            (last, -node.depth, block, key) for block, node in self._tree.items() for key, last in node.holders.items()
        )
        for _, _, block, key in pairs[: self._size - self.max_tree_blocks]:
            node = self._tree[block]
            del node.holders[key]
            if not node.holders:
                del self._tree[block]
        self._size = min(self._size, self.max_tree_blocks)
