"""``prefix_hash``: the SGLang Model Gateway's consistent-hashing prefix policy, with ``--dp-aware``.

Source: smg 1.13.0 (the PyPI source distribution; unchanged from smg-project/smg @f8daa88),
``model_gateway/src/policies/prefix_hash.rs`` (``PrefixHashPolicy``,
``find_worker_with_load_balance``, ``load_ok``) and ``model_gateway/src/worker/hash_ring.rs`` (``HashRing``, 150
virtual nodes per worker); defaults from ``bindings/python/src/smg/router_args.py``. A worker is a DP rank
(``--dp-aware``).

The request's prompt head is hashed onto a ring of the usable ranks serving its model; the rank there takes it
unless it is overloaded: its load above both ``load_factor`` times and ``balance_abs_threshold`` more than the
mean load counting the new request, ``(total + 1) / n``. An overloaded target hands the request to the least
loaded rank that is not overloaded, or keeps it when all are. A request without a head goes to the least loaded
rank. Load is smg's router-side in-flight count; here the rank's waiting + running requests.

**Blocks, not tokens.** smg hashes the first ``prefix_token_count`` = 256 tokens (or 1,024 characters). Here the
head is the prompt's first 512-token block (:attr:`~gateway.types.PendingRequest.prefix_blocks`), so two prompts
that share 256 tokens but not 512 hash apart, where smg would group them. Ring positions use BLAKE2b where smg
uses BLAKE3 (positions differ; the spread over ranks is the same in kind).
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence

from gateway.scheduling.baselines.base import serving
from gateway.scheduling.baselines.indexed import LiveRanks, LoadOrder, LoadSum, PerModel
from gateway.types import PendingRequest, RankKey, RankLoad

LOAD_FACTOR = 1.25
"""Overload threshold, multiple of the mean load (``--prefix-hash-load-factor``)."""

BALANCE_ABS_THRESHOLD = 10
"""Overload threshold, requests above the mean load (``--prefix-hash-balance-abs-threshold``)."""

VIRTUAL_NODES = 150
"""Ring positions per rank (``VIRTUAL_NODES_PER_WORKER`` in ``hash_ring.rs``)."""


def _position(label: str) -> int:
    return int.from_bytes(hashlib.blake2b(label.encode(), digest_size=8).digest(), "big")


class _LiveRing:
    """One model's live candidates for :meth:`PrefixHash.choose_live`: by queue length, their total, and the ring of
    the candidates as of :attr:`layout`."""

    def __init__(self, live: LiveRanks, model: str) -> None:
        self.order = LoadOrder(live, model, lambda r: r.queue_length)
        self.total = LoadSum(live, model, lambda r: r.queue_length)
        self.layout = -1
        self.ring: tuple[list[int], list[int]] = ([], [])


class PrefixHash:
    """The ring of a set of ranks is built once and kept; the last one is found again by comparing the candidates'
    keys (the load view hands out the same key objects, so the comparison is by identity, with no hashing), and
    the ring names its owners by position among the candidates. A request then costs one pass over the candidates
    (the mean load) and a binary search of the ring."""

    name = "prefix_hash"

    def __init__(self) -> None:
        self._rings: dict[tuple[RankKey, ...], tuple[list[int], list[int]]] = {}
        self._last: tuple[tuple[RankKey, ...], tuple[list[int], list[int]]] | None = None
        self._live = PerModel(_LiveRing)

    def _ring(self, keys: tuple[RankKey, ...]) -> tuple[list[int], list[int]]:
        """Ring positions, sorted, and the index in ``keys`` of each position's owner."""
        last = self._last
        if last is not None and last[0] == keys:
            return last[1]
        ring = self._rings.get(keys)
        if ring is None:
            entries = sorted(
                (_position(f"{key}#{v}"), key, i) for i, key in enumerate(keys) for v in range(VIRTUAL_NODES)
            )
            ring = ([p for p, _, _ in entries], [i for _, _, i in entries])
            self._rings[keys] = ring
        self._last = (keys, ring)
        return ring

    def choose_live(self, request: PendingRequest, live: LiveRanks) -> RankKey | None:
        state = self._live.get(live, request.model)
        candidates = state.order.sync()
        state.total.sync()
        n = len(candidates)
        if not n:
            return None
        order = state.order.order
        if not request.prefix_blocks:
            return candidates.load(order[0][1]).key
        if state.layout != candidates.layout:
            state.ring = self._ring(tuple(candidates.load(j).key for j in range(n)))
            state.layout = candidates.layout
        positions, owners = state.ring
        target = candidates.load(
            owners[bisect.bisect_left(positions, _position(str(request.prefix_blocks[0]))) % len(owners)]
        )
        mean = (state.total.total() + 1) / n
        threshold = max(mean * LOAD_FACTOR, mean + BALANCE_ABS_THRESHOLD)
        if target.queue_length <= threshold or order[0][0] > threshold:
            return target.key
        return candidates.load(order[0][1]).key

    def choose(self, request: PendingRequest, ranks: Sequence[RankLoad]) -> RankKey | None:
        candidates = serving(request, ranks)
        if not candidates:
            return None
        if not request.prefix_blocks:
            return min(candidates, key=lambda r: r.queue_length).key
        positions, owners = self._ring(tuple(r.key for r in candidates))
        target = candidates[
            owners[bisect.bisect_left(positions, _position(str(request.prefix_blocks[0]))) % len(owners)]
        ]
        mean = (sum(r.waiting + r.running for r in candidates) + 1) / len(candidates)
        threshold = max(mean * LOAD_FACTOR, mean + BALANCE_ABS_THRESHOLD)
        if target.queue_length <= threshold:
            return target.key
        fine = [r for r in candidates if r.queue_length <= threshold]
        return min(fine, key=lambda r: r.queue_length).key if fine else target.key
