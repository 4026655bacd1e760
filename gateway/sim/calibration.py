"""Timing and capacity constants of the simulated DP+EP engine, calibrated on public numbers.

Published numbers (docs/design.md §5.1), all for DeepSeek-V3 unless noted:

- DeepSeek inference-system overview (Feb 2025), H800, EP32 prefill: about 7.8k prompt tokens/s per GPU
  at 16k tokens per GPU per step of 4k-token prompts (so ≈ 2.1 s a step); decode: about 55 ms a step at
  128 running requests per GPU with 4k context; KV cache about 70 KB per token.
- DeepEP README: all-to-all per MoE layer at EP32 about 155 µs dispatch + 273 µs combine; 58 MoE layers.
- lmsys SGLang blog (May 2025), H100: prefill 57.7k / 54.5k / 50.3k tokens/s per node at 1k / 2k / 4k
  prompts (used only for the *ratio* between prompt lengths, which fixes the quadratic attention term).

Derived model (our fit, labelled "derived" below). For one DP rank in one step:

- prefill of a chunk of ``c`` new tokens of a request whose context before the chunk is ``p``:
  ``prefill_token_s * c + prefill_attn_s * c * (p + c / 2)``: a linear term (MLP/MoE compute) plus the
  attention of each new token over its ``p + c/2`` predecessors on average.
  Check: 4 prompts × 4096 tokens = 16384 tokens → 4 × (1.063e-4·4096 + 1.07e-8·4096·2048) ≈ 2.10 s,
  + all-to-all 0.025 s → 7.7k tokens/s (published 7.8k). 16 prompts × 1024 tokens → 1.83 s; the ratio
  2.10 / 1.83 = 1.147 matches 57.7k / 50.3k = 1.147.
- decode: ``decode_req_s * running + decode_kv_s * kv_tokens_of_running``.
  Check: 128 × 1.2e-4 + 128·4096 × 2.86e-8 + 0.0248 ≈ 0.0154 + 0.0150 + 0.0248 ≈ 55 ms (published 55 ms).
- step time of the whole instance = ``alltoall_s + max over ranks(per-rank prefill + decode work)``.
"""

from __future__ import annotations

from dataclasses import dataclass

DEEPEP_EP32_DISPATCH_S = 155e-6
"""DeepEP all-to-all dispatch latency per MoE layer at EP32, seconds (DeepEP README, H800)."""

DEEPEP_EP32_COMBINE_S = 273e-6
"""DeepEP all-to-all combine latency per MoE layer at EP32, seconds (DeepEP README, H800)."""

DEEPSEEK_V3_MOE_LAYERS = 58
"""Number of MoE layers of DeepSeek-V3 (61 layers, the first 3 dense; model card)."""


@dataclass(frozen=True)
class EngineModelConfig:
    """Per-rank timing and capacity of one simulated DP+EP engine instance (all ranks identical).

    Raises:
        ValueError: on construction, if a time constant is negative or a capacity is not positive.
    """

    prefill_token_s: float = 1.063e-4
    """Linear prefill cost, seconds per new prompt token on one rank. Derived (module docstring): fits
    DeepSeek's 7.8k tokens/s per H800 at 16k tokens/step of 4k prompts together with ``prefill_attn_s``."""

    prefill_attn_s: float = 1.07e-8
    """Quadratic (attention) prefill cost, seconds per (new token × context token) on one rank. Derived:
    fits the lmsys SGLang H100 1k-vs-4k prompt throughput ratio 57.7k / 50.3k."""

    decode_req_s: float = 1.2e-4
    """Decode cost, seconds per running request per step on one rank. Derived: with ``decode_kv_s`` and
    ``alltoall_s`` reproduces DeepSeek's ≈ 55 ms step at 128 requests × 4k context per H800."""

    decode_kv_s: float = 2.86e-8
    """Decode attention cost, seconds per KV token of the running requests per step on one rank. Derived
    (see ``decode_req_s``)."""

    alltoall_s: float = DEEPSEEK_V3_MOE_LAYERS * (DEEPEP_EP32_DISPATCH_S + DEEPEP_EP32_COMBINE_S)
    """All-to-all latency paid by every step of the instance, seconds: 58 MoE layers × (155 + 273) µs
    (DeepEP EP32 dispatch + combine) ≈ 24.8 ms. Derived."""

    max_prefill_tokens_per_step: int = 8192
    """Chunked-prefill budget, new prompt tokens per rank per step (SGLang ``--chunked-prefill-size``,
    vLLM ``--max-num-batched-tokens``); 8192 is a common production setting, the calibration point above
    used 16384. Decode tokens do not count against it (SGLang semantics)."""

    max_running_requests: int = 256
    """Most requests one rank holds at once (decoding plus admitted to prefill), requests (SGLang
    ``--max-running-requests``, vLLM ``--max-num-seqs``; 256 is vLLM's classic default)."""

    kv_capacity_tokens: int = 600_000
    """KV cache capacity of one rank, tokens. Derived: ≈ 50 GB of HBM free for KV on an 80 GB H800 after
    the DP+EP weight shard, / ≈ 70 KB per token (DeepSeek) ≈ 700k; rounded down to 600k to stay
    conservative (activations, CUDA graphs and fragmentation take some of it)."""

    def __post_init__(self) -> None:
        for name in ("prefill_token_s", "prefill_attn_s", "decode_req_s", "decode_kv_s", "alltoall_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_prefill_tokens_per_step", "max_running_requests", "kv_capacity_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def prefill_chunk_s(self, chunk_tokens: int, context_tokens: int) -> float:
        """Seconds one rank spends prefilling ``chunk_tokens`` new tokens after ``context_tokens`` tokens
        already in the request's KV cache (formula in the module docstring)."""
        c = chunk_tokens
        return self.prefill_token_s * c + self.prefill_attn_s * c * (context_tokens + c / 2)

    def decode_s(self, running_requests: int, kv_tokens: int) -> float:
        """Seconds one rank spends on one decode token for ``running_requests`` requests holding
        ``kv_tokens`` KV tokens in total."""
        return self.decode_req_s * running_requests + self.decode_kv_s * kv_tokens
