"""The gateway's vocabulary: DP ranks, their load, requests waiting to be placed, and what engines report.

A leaf module: it imports nothing of the gateway and no third-party package, so the scheduling core, the load
view, the engine adapters and the simulator can all share these names without importing each other. Pure
data and one pure function (:func:`prefix_block_hashes`); token counts are tokens, times are seconds on whatever
clock the caller passes in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

PREFIX_BLOCK_TOKENS = 512
"""Tokens per prompt block of :attr:`PendingRequest.prefix_blocks`: the block of the Mooncake traces' ``hash_ids``
(Qin et al., "Mooncake", FAST'25, trace README: one id per 512-token block)."""

PREFIX_BLOCK_CHARS = PREFIX_BLOCK_TOKENS * 4
"""Characters of text per block when the prompt is hashed from its text: :data:`PREFIX_BLOCK_TOKENS` times the
4 characters per token of the gateway's estimator (``gateway.tokens.CHARS_PER_TOKEN``; SMG's ``prefix_hash``
uses the same 4 for untokenized requests, ``model_gateway/src/policies/prefix_hash.rs`` ``CHARS_PER_TOKEN``)."""


@dataclass(frozen=True, slots=True, order=True)
class RankKey:
    """One DP rank of one engine: ``(engine name, rank index in [0, dp_size))``."""

    engine: str
    rank: int

    def __str__(self) -> str:
        return f"{self.engine}/{self.rank}"


@dataclass(frozen=True, slots=True)
class RankLoad:
    """What the scheduler knows about one DP rank at one instant (a snapshot).

    Attributes:
        key: the rank.
        models: models the rank's engine serves.
        prefill_budget: prefill tokens the rank takes per forward step (its per-step capacity; the engine's
            ``prefill_budget_tokens`` setting).
        running: requests decoding on the rank (on a P/D decode rank also those waiting for or receiving their KV:
            they decode there without a prefill).
        waiting: requests queued on the rank, not yet prefilled.
        queued_prefill_tokens: prompt tokens sent to the rank and not yet prefilled (local accounting).
        kv_tokens: KV cache tokens held by the rank's requests (local accounting, prompt + generated; on a P/D
            decode rank reconciled with the engine's figure where it reports one, see :mod:`gateway.load.view`).
        kv_usage: KV cache usage reported by the engine, fraction 0–1, or ``None`` when unknown.
        usable: whether new requests may be placed on the rank.
        decode_prealloc: P/D decode: of ``running``, the requests waiting for their KV to be reserved.
        decode_transfer: P/D decode: of ``running``, the requests receiving their KV from the prefill side.
    """

    key: RankKey
    models: frozenset[str]
    prefill_budget: int
    running: float = 0.0
    waiting: float = 0.0
    queued_prefill_tokens: float = 0.0
    kv_tokens: float = 0.0
    kv_usage: float | None = None
    usable: bool = True
    decode_prealloc: float = 0.0
    decode_transfer: float = 0.0

    @property
    def queue_length(self) -> float:
        """Waiting plus running requests (the shortest-queue baseline's load)."""
        return self.waiting + self.running

    @property
    def outstanding_tokens(self) -> float:
        """Tokens still to prefill plus KV tokens held (the least-tokens baseline's load)."""
        return self.queued_prefill_tokens + self.kv_tokens


@dataclass(slots=True)
class PendingRequest:
    """A request the gateway holds until it is placed on a DP rank.

    Attributes:
        request_id: unique id.
        model: requested model name.
        prompt_tokens: estimated prompt tokens (see :mod:`gateway.tokens`).
        max_output_tokens: output tokens the request may generate.
        arrival_s: when the gateway received it (caller's clock, seconds).
        stream: whether the client streams (the load view then sees its first token).
        deferrals: how many closed windows could not place it.
        prefix_blocks: the prompt as a chain of block hashes, one per :data:`PREFIX_BLOCK_TOKENS` tokens (the
            last block may be partial); block ``i``'s hash covers the whole prompt up to the end of block ``i``,
            so two prompts share their first ``k`` hashes exactly when they share their first ``k`` blocks. The
            front door hashes the request's text (:func:`prefix_block_hashes`), the simulator takes a Mooncake
            trace's ``hash_ids``; empty when unknown (Azure traces carry none). Cache-aware policies match
            prefixes on it at block granularity: a prefix shared for part of a block counts as unshared, and
            text hashing aligns blocks on characters, not tokens.
        tenant: the tenant the request is charged to (``tenants``; empty when no tenants are configured).
        priority: the request's priority class, an index into ``tenants.classes`` (0 the highest; 0 when no tenants
            are configured).
    """

    request_id: str
    model: str
    prompt_tokens: int
    max_output_tokens: int
    arrival_s: float
    stream: bool = True
    deferrals: int = field(default=0)
    prefix_blocks: tuple[int, ...] = ()
    tenant: str = ""
    priority: int = 0


def prefix_block_hashes(texts: Iterable[str], block_chars: int = PREFIX_BLOCK_CHARS) -> tuple[int, ...]:
    """Chained hashes of consecutive ``block_chars``-character blocks of the concatenated ``texts`` (see
    :attr:`PendingRequest.prefix_blocks`); the last block may be shorter, an empty text gives ``()``.

    Each hash is the first 8 bytes of BLAKE2b over the previous block's digest and the block's UTF-8 bytes, as
    an unsigned integer. The parts are joined with a NUL so ``["ab", "c"]`` and ``["a", "bc"]`` differ.
    Cost: one pass of BLAKE2b over the prompt (``bench/prefix_hash_cost.py``).
    """
    text = "\0".join(texts)
    blocks: list[int] = []
    previous = b""
    for start in range(0, len(text), block_chars):
        digest = hashlib.blake2b(previous + text[start : start + block_chars].encode(), digest_size=8).digest()
        blocks.append(int.from_bytes(digest, "big"))
        previous = digest
    return tuple(blocks)


@dataclass(frozen=True, slots=True)
class RankMetrics:
    """Load of one DP rank as the engine reports it (parsed from its ``/metrics`` by an engine adapter).

    Attributes:
        running: requests decoding (or in a running batch); on a P/D decode rank also the requests waiting for
            their KV or receiving it (``decode_prealloc``, ``decode_transfer``, ``decode_retracted``): each will
            decode there without a prefill of its own.
        waiting: requests queued, not yet scheduled (on a P/D prefill rank also those in its bootstrap queue,
            ``prefill_bootstrap``).
        kv_usage: KV cache usage, fraction 0–1, or ``None`` if not reported.
        kv_used_tokens: KV cache tokens in use, or ``None`` if not reported.
        kv_capacity_tokens: KV cache capacity in tokens, or ``None`` if not reported.
        queued_prefill_tokens: prompt tokens waiting for prefill and not in the prefix cache (SGLang ``GET
            /v1/loads`` ``num_waiting_uncached_tokens``), or ``None`` if not reported.
        queued_read_at: when the figures of the engine's load endpoint (``queued_prefill_tokens``, ``kv_tokens``)
            were asked for, on the gateway's clock (seconds): requests dispatched from then on may be missing from
            them. ``None``: when the scrape arrived.
        decode_prealloc: P/D decode: requests waiting for their KV to be reserved (SGLang's pre-allocation queue;
            vLLM's KV consumer: stage ``waiting_to_start``), counted in ``running``; ``None`` if not reported.
        decode_transfer: P/D decode: requests with their KV reserved, receiving it from the prefill side (SGLang's
            transfer queue; vLLM: stage ``in_progress``), counted in ``running``; ``None`` if not reported.
        decode_retracted: P/D decode: requests retracted for lack of KV, waiting to resume (SGLang), counted in
            ``running``; ``None`` if not reported.
        prefill_bootstrap: P/D prefill: requests waiting for their decode side before their prefill (SGLang's
            bootstrap queue), counted in ``waiting``; ``None`` if not reported.
        prefill_inflight: P/D prefill: prefilled requests whose KV the rank keeps until the decode side has it
            (SGLang's inflight queue); ``None`` if not reported.
        kv_tokens: KV tokens the rank's requests hold, have reserved or will reserve (SGLang ``GET /v1/loads``
            ``num_total_tokens``: on a decode rank the KV in use, the reservations of requests in transfer
            included, plus the pre-allocation and retracted queues' tokens), or ``None`` if not reported.
    """

    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float | None = None
    kv_used_tokens: float | None = None
    kv_capacity_tokens: float | None = None
    queued_prefill_tokens: float | None = None
    queued_read_at: float | None = None
    decode_prealloc: float | None = None
    decode_transfer: float | None = None
    decode_retracted: float | None = None
    prefill_bootstrap: float | None = None
    prefill_inflight: float | None = None
    kv_tokens: float | None = None


FailureScope = Literal["engine", "rank"]
"""What a failed request counts against: its whole engine (unreachable, failed ``/health`` probe) or only the
DP rank that served it (HTTP 5xx, timeout, broken stream). See :mod:`gateway.load.health`."""
