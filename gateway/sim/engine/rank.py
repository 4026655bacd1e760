"""One DP rank's state in the engine model: its requests, queues and KV accounting.

A rank holds a FCFS *waiting* queue of requests not yet fully prefilled and a *running* set of decoding requests;
under P/D disaggregation (:mod:`gateway.sim.engine.pd`) a prefill rank also keeps the KV of finished requests until
the decode side has fetched it (*held*), and a decode rank queues requests for a KV reservation (*prealloc*) and
fetches their KV (*transfer*) before they run.
Its KV is counted in tokens and in ``kv_block_size`` blocks (vLLM allocates whole blocks; SGLang's page is one
token). With a prefix cache, KV a request shares with the cache is counted once, while some request holds it;
idle cached blocks are counted by the cache (:mod:`gateway.sim.engine.prefix_cache`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.types import PREFIX_BLOCK_TOKENS

if TYPE_CHECKING:
    from gateway.sim.engine.prefix_cache import CachedBlock, PrefixCache


@dataclass(eq=False, slots=True)
class Request:
    """A request in the model: its lengths, what the engine believes of it, and its progress."""

    request_id: str
    rank: int
    prompt_tokens: int
    output_tokens: int
    max_new_tokens: int  # what the engine believes it may generate (never the true output)
    ignore_eos: bool
    ready_step: int  # first step index it may join
    prefill_target: int  # tokens to prefill: the prompt, plus the output so far after a preemption
    prefilled: int = 0
    generated: int = 0
    kv: int = 0
    admitted: bool = False
    admit_seq: int = 0
    prefix_blocks: tuple[int, ...] = ()  # the prompt's chained block ids, one per prefix_block_tokens
    prefix_block_tokens: int = PREFIX_BLOCK_TOKENS
    cache_refs: list[CachedBlock] = field(default_factory=list)  # cached blocks it holds a reference on
    cache_next: int = 0  # index of the next prompt block to insert into the cache
    arrival_s: float = 0.0  # on the engine's clock (FairBatching's deadlines)
    hold_kv: bool = False  # P/D prefill: its KV stays held for the decode side after it finishes
    held_until_s: float | None = None  # P/D prefill: when a held KV's lease expires (None: no lease)
    remote_prefill: bool = False  # P/D decode: its prompt's KV comes from a prefill rank
    kv_ready: bool = False  # P/D decode: the prefill side has the KV ready to fetch
    transfer_end_s: float | None = None  # P/D decode: when its KV transfer completes (None: not started)

    @property
    def kv_reservation(self) -> int:
        return self.prompt_tokens + self.output_tokens


@dataclass(eq=False)
class Rank:
    """A DP rank: its queues, the KV its requests use (tokens and blocks), what admission reserved, and its prefix
    cache (None without ``enable_prefix_caching``)."""

    new_token_ratio: float  # SGLang's admission estimate on this rank
    kv_block_size: int
    cache: PrefixCache | None = None
    waiting: dict[str, Request] = field(default_factory=dict)  # insertion order = FCFS
    running: dict[str, Request] = field(default_factory=dict)  # insertion order = prefill completion
    kv_used: int = 0
    kv_blocks: int = 0
    kv_reserved: int = 0
    admitted: int = 0  # running + admitted waiting
    preemptions: int = 0
    prealloc: dict[str, Request] = field(default_factory=dict)  # P/D decode: waiting for a KV reservation, FCFS
    transfer: dict[str, Request] = field(default_factory=dict)  # P/D decode: KV reserved, fetching it
    held: dict[str, Request] = field(default_factory=dict)  # P/D prefill: finished, KV kept for the decode side

    def free_kv(self, req: Request) -> None:
        """Free ``req``'s KV; the cached blocks it held and no other request holds become idle in the cache."""
        self.kv_used -= req.kv
        self.kv_blocks -= ceil_div(req.kv, self.kv_block_size)
        if self.cache is not None:
            tokens, blocks = self.cache.release(req)
            self.kv_used += tokens
            self.kv_blocks += blocks

    def fit_cache(self) -> None:
        """Evict idle cached blocks until the rank's KV fits (nothing without a cache)."""
        if self.cache is not None:
            self.cache.fit(self.kv_used, self.kv_blocks)


@dataclass(slots=True)
class RankStep:
    """What one rank runs in a step: seconds of work, prompt tokens and requests prefilled, the requests it decodes
    and those whose prefill completes (both emit a token when the step ends)."""

    work_s: float = 0.0
    prefill_tokens: int = 0
    prefill_reqs: int = 0
    decoding: list[Request] = field(default_factory=list)
    completed: list[Request] = field(default_factory=list)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
