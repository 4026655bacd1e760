"""A DP rank's prefix cache (with ``EngineModelConfig.enable_prefix_caching``).

The prompt blocks a request computed stay in its rank's KV after it leaves; a later request on the same rank whose
prompt starts with them skips their prefill. Blocks held by a request are never evicted; idle ones are evicted least
recently used first when the rank's KV is needed (vLLM ``--enable-prefix-caching``, SGLang's radix cache; sources
in :attr:`gateway.sim.calibration.EngineModelConfig.enable_prefix_caching`). Blocks are the prompt block ids the
driver passes (:meth:`gateway.sim.engine_model.EngineModel.add_request`), cached in whole ``kv_block_size`` blocks.

The KV of blocks some request holds is counted in the rank's KV (:class:`gateway.sim.engine.rank.Rank`), once
however many requests hold it; the cache counts its idle blocks itself. The methods that move blocks between the
two return the tokens and KV blocks the rank's count gains.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.sim.engine.rank import Request


@dataclass(eq=False, slots=True)
class CachedBlock:
    """One prompt block in a rank's prefix cache: its id, KV tokens and KV blocks, the requests holding it, and
    the first step that may hit it (the step after the one that computed it)."""

    key: int
    tokens: int
    blocks: int
    ready_step: int
    refs: int = 0


class PrefixCache:
    """A rank's prefix cache: every cached block by id, the unreferenced ones in eviction order (least recently
    used first), and the hit counters the engines export.

    Args:
        capacity_tokens: the rank's KV capacity, tokens.
        block_size: KV allocation granularity, tokens (``kv_block_size``).
    """

    def __init__(self, capacity_tokens: int, block_size: int) -> None:
        self._capacity_tokens = capacity_tokens
        self._block_size = block_size
        self._blocks: dict[int, CachedBlock] = {}
        self._idle: OrderedDict[int, CachedBlock] = OrderedDict()
        self._idle_tokens = 0
        self._idle_blocks = 0
        self._queries = 0
        self._hits = 0
        self._batch_step = -1  # the step whose hits and prefilled tokens are being summed
        self._batch_hits = 0
        self._batch_input = 0
        self._hit_rate = 0.0  # SGLang's gauge, from the latest finished step that prefilled
        self._tokens = 0  # tokens of every cached block, referenced or idle

    def hit(self, req: Request, step: int) -> tuple[int, int]:
        """Look ``req`` up before admission in step ``step``: the longest run of its leading prompt blocks held
        here (and computed by an earlier step) becomes prefilled, and the request references those blocks, so
        they cannot be evicted while it runs and cost no prefill. Both engines compute at least the prompt's last
        token (vLLM ``Request.get_max_cache_hit_length``: ``num_tokens - 1``; SGLang likewise keeps one token to
        extend), so a hit stops before a block that would cover the whole prompt. Counts the lookup in vLLM's
        ``vllm:prefix_cache_queries``/``_hits`` unless the request was preempted before (vLLM counts those apart,
        ``PrefixCacheStats.record``).

        Returns:
            the tokens and KV blocks of the hit blocks that were idle, which the rank's KV now counts.
        """
        self._roll(step)
        fresh = req.generated == 0
        if fresh:
            self._queries += req.prompt_tokens
        if req.prefilled or not req.prefix_blocks:
            return 0, 0
        limit = req.prompt_tokens - 1
        hit = 0
        refs: list[CachedBlock] = []
        for key in req.prefix_blocks:
            block = self._blocks.get(key)
            if block is None or block.ready_step > step or hit + block.tokens > limit:
                break
            hit += block.tokens
            refs.append(block)
        if not refs:
            return 0, 0
        used_tokens = used_blocks = 0
        for block in refs:
            if block.refs == 0:
                del self._idle[block.key]
                self._idle_tokens -= block.tokens
                self._idle_blocks -= block.blocks
                used_tokens += block.tokens
                used_blocks += block.blocks
            block.refs += 1
        req.cache_refs = refs
        req.cache_next = len(refs)
        req.prefilled = req.kv = hit
        self._batch_hits += hit
        if fresh:
            self._hits += hit
        return used_tokens, used_blocks

    def unhit(self, req: Request) -> None:
        """Take back the counts of :meth:`hit` for a request admission refused (the rank then frees its KV: it
        holds no blocks while it waits, and they go back to the idle list as just used, as SGLang's prefix match
        refreshes them)."""
        if req.generated == 0:
            self._queries -= req.prompt_tokens
            self._hits -= req.prefilled
        self._batch_hits -= req.prefilled

    def computed(self, req: Request, chunk: int, step: int) -> None:
        """``req`` just prefilled ``chunk`` tokens in step ``step``: each prompt block now wholly computed enters
        the cache, held by ``req``, hittable from the next step on. Only whole KV blocks are cached (vLLM caches
        full blocks, ``kv_block_size`` tokens; SGLang's page is 1 token), so a partial last prompt block is cached
        rounded down. A block already cached (computed meanwhile by another request) stays the request's own copy.
        The rank's KV already counts the chunk; the caller then fits the cache (:meth:`fit`)."""
        self._roll(step)
        self._batch_input += chunk
        size, page = req.prefix_block_tokens, self._block_size
        while req.cache_next < len(req.prefix_blocks):
            i = req.cache_next
            end = min((i + 1) * size, req.prompt_tokens)
            if end > req.prefilled:
                break
            req.cache_next += 1
            key = req.prefix_blocks[i]
            tokens = (end - i * size) // page * page
            if tokens <= 0 or key in self._blocks:
                continue  # no whole KV block (or a block id past the prompt's end), or cached already
            block = CachedBlock(key, tokens, tokens // page, step + 1, refs=1)
            self._blocks[key] = block
            self._tokens += tokens
            req.cache_refs.append(block)

    def release(self, req: Request) -> tuple[int, int]:
        """``req`` leaves the rank or is preempted (the rank just freed its KV, counted whole): the blocks it held
        and no other request holds become idle, last block first, so that the least recently used block, and
        within a prompt its tail, is evicted first (vLLM ``BlockPool.free_blocks`` frees a request's blocks in
        reverse order; SGLang's radix cache evicts least recently used leaves first).

        Returns:
            the tokens and KV blocks of its blocks other requests still hold, which the rank's KV still counts.
        """
        held_tokens = held_blocks = 0
        for block in reversed(req.cache_refs):
            block.refs -= 1
            if block.refs == 0:
                self._idle[block.key] = block
                self._idle_tokens += block.tokens
                self._idle_blocks += block.blocks
            else:
                held_tokens += block.tokens
                held_blocks += block.blocks
        req.cache_refs = []
        req.cache_next = 0
        return held_tokens, held_blocks

    def fit(self, used_tokens: int, used_blocks: int) -> None:
        """Evict idle blocks, least recently used first, while the KV the rank's requests use (``used_tokens``,
        ``used_blocks``) plus the idle cache exceeds the rank's capacity (both engines count idle cached blocks as
        free and evict them on allocation)."""
        capacity_blocks = self._capacity_tokens // self._block_size
        while self._idle and (
            used_tokens + self._idle_tokens > self._capacity_tokens or used_blocks + self._idle_blocks > capacity_blocks
        ):
            key, block = self._idle.popitem(last=False)
            del self._blocks[key]
            self._idle_tokens -= block.tokens
            self._idle_blocks -= block.blocks
            self._tokens -= block.tokens

    def stats(self, step: int) -> dict[str, Any]:
        """The prefix-cache fields of :class:`gateway.sim.engine_model.RankStats` before step ``step``."""
        self._roll(step)
        return {
            "prefix_cache_queries": self._queries,
            "prefix_cache_hits": self._hits,
            "cache_hit_rate": self._hit_rate,
            "prefix_cache_tokens": self._tokens,
        }

    def _roll(self, step: int) -> None:
        """Close the step whose hits and prefilled tokens the cache sums once a later step runs: SGLang sets
        ``sglang:cache_hit_rate`` after each prefill batch to its cached tokens over cached plus new tokens
        (sglang/srt/managers/scheduler_components/metrics_reporter.py ``report_prefill_stats``)."""
        if self._batch_step == step:
            return
        if self._batch_input > 0:
            self._hit_rate = self._batch_hits / (self._batch_hits + self._batch_input)
        self._batch_step, self._batch_hits, self._batch_input = step, 0, 0
