"""Which prompt blocks each DP rank probably holds in its prefix cache, from the prompts the gateway placed there.

Both engines keep a prompt's KV after the request leaves and skip the prefill of a later prompt's leading blocks
that are still cached on the same DP rank (SGLang's radix cache, vLLM's ``--enable-prefix-caching``), evicting idle
blocks least recently used first when the rank's KV is needed. The gateway cannot see those caches (vLLM's KV
events aside), but it knows every prompt it sent to each rank: this index replays that, per rank, in blocks of
:data:`~gateway.types.PREFIX_BLOCK_TOKENS` tokens (the chained hashes of
:attr:`~gateway.types.PendingRequest.prefix_blocks`), with least-recently-used eviction beyond a capacity in
tokens (the engine's KV capacity per rank: SGLang exports it as ``sglang:max_total_num_tokens``). It is
approximate in two ways, both towards fewer hits than the engine finds: a block shared for part of its 512 tokens
counts as unshared, and the engine's cache also loses space to the KV of the requests running there, so a
capacity set to the whole KV keeps blocks the engine may have evicted under load.

Memory is bounded: at most ``capacity_tokens / PREFIX_BLOCK_TOKENS`` blocks per rank, each held once per rank and
once in the reverse map (block → ranks) that :meth:`PrefixIndex.match` walks, so a lookup costs the matched
prefix's length times the ranks holding it, not the number of ranks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet

from gateway.types import PREFIX_BLOCK_TOKENS, RankKey


class PrefixIndex:
    """Per DP rank, the prompt blocks placed there, least recently used evicted first.

    Args:
        capacity_tokens: prefix-cache capacity of one rank, tokens (>= ``block_tokens``).
        block_tokens: tokens per block of the prefix hashes.

    Raises:
        ValueError: ``capacity_tokens < block_tokens`` or ``block_tokens < 1``.
    """

    def __init__(self, capacity_tokens: int, block_tokens: int = PREFIX_BLOCK_TOKENS) -> None:
        if block_tokens < 1 or capacity_tokens < block_tokens:
            raise ValueError(f"need capacity_tokens >= block_tokens >= 1, got {capacity_tokens}, {block_tokens}")
        self.block_tokens = block_tokens
        self.capacity_blocks = capacity_tokens // block_tokens
        self._ranks: dict[RankKey, OrderedDict[int, None]] = {}
        self._holders: dict[int, set[RankKey]] = {}

    def match(self, blocks: Sequence[int]) -> dict[RankKey, int]:
        """Leading blocks of ``blocks`` each rank holds, for every rank holding at least the first one."""
        if not blocks:
            return {}
        first = self._holders.get(blocks[0])
        if not first:
            return {}
        matched = dict.fromkeys(first, 1)
        current = set(first)
        for depth, block in enumerate(blocks[1:], start=2):
            holders = self._holders.get(block)
            if not holders:
                break
            current &= holders
            if not current:
                break
            for key in current:
                matched[key] = depth
        return matched

    def holders(self, blocks: Iterable[int]) -> list[AbstractSet[RankKey]]:
        """For each of ``blocks``, the ranks holding it (empty when none): read-only views into the index, valid
        until it next changes."""
        get = self._holders.get
        none: frozenset[RankKey] = frozenset()
        return [get(block, none) for block in blocks]

    def cached_tokens(self, matched_blocks: int, prompt_tokens: int) -> int:
        """Prompt tokens a rank holding ``matched_blocks`` leading blocks skips: at most ``prompt_tokens - 1``
        (the engine computes at least the last token to produce the first output)."""
        return max(0, min(prompt_tokens - 1, matched_blocks * self.block_tokens))

    def insert(self, key: RankKey, blocks: Sequence[int]) -> None:
        """The prompt ``blocks`` were placed on rank ``key``: they are its most recently used, and its least
        recently used blocks beyond the capacity are forgotten."""
        if not blocks:
            return
        lru = self._ranks.get(key)
        if lru is None:
            lru = self._ranks[key] = OrderedDict()
        for block in blocks:
            if block in lru:
                lru.move_to_end(block)
            else:
                lru[block] = None
                self._holders.setdefault(block, set()).add(key)
        while len(lru) > self.capacity_blocks:
            old, _ = lru.popitem(last=False)
            holders = self._holders[old]
            holders.discard(key)
            if not holders:
                del self._holders[old]

    def forget(self, engine: str) -> None:
        """Drop every rank of ``engine`` (its caches are gone: it restarted or left)."""
        for key in [k for k in self._ranks if k.engine == engine]:
            for block in self._ranks.pop(key):
                holders = self._holders[block]
                holders.discard(key)
                if not holders:
                    del self._holders[block]

    def blocks(self, key: RankKey) -> int:
        """Blocks the index holds for rank ``key``."""
        lru = self._ranks.get(key)
        return 0 if lru is None else len(lru)
