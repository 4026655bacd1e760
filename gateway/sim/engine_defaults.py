"""What SGLang and vLLM do by default, as shipped, for the settings the engine model takes from them.

Each function turns an engine's own command-line settings (``None`` = not given) into the per-DP-rank value that
engine would run with. Sources are the engines' released Python sources: SGLang 0.5.23 and vLLM 0.34.0 (wheels
from PyPI; paths are inside the wheel, the repository adds ``python/`` for SGLang). The hardware assumed is the
one the calibration uses: H800 80 GB GPUs, one DP rank per GPU, DP attention with expert parallelism over the
whole instance (EP size = DP size).
"""

from __future__ import annotations

import bisect
import math
from typing import Literal

EngineFlavor = Literal["sglang", "vllm"]
"""The engine whose defaults and step rules a profile follows."""

SGLANG_DEFAULT_CHUNKED_PREFILL_SIZE = 8192
"""SGLang's ``--chunked-prefill-size`` when unset on a GPU of 60-160 GB (H100/H800/H200), tokens per step for the
whole DP group (sglang/srt/arg_groups/memory_hook.py ``handle_gpu_memory_settings``: 2,048 under 20 GB, 4,096 under
60 GB, 8,192 under 160 GB, 16,384 above)."""

SGLANG_DP_ATTENTION_CONSERVATIVENESS = 0.3
"""Factor SGLang applies to ``--schedule-conservativeness`` under DP attention, without a warning
(sglang/srt/arg_groups/parallel_hook.py, ``_handle_data_parallelism``)."""

DEEPSEEK_V3_CONTEXT_LENGTH = 163_840
"""DeepSeek-V3's ``max_position_embeddings`` (its config.json): the context length SGLang sizes its request pool
with."""

VLLM_DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
"""vLLM's ``--max-num-batched-tokens`` for the OpenAI server on a GPU of 70-160 GB that is not an A100
(vllm/engine/arg_utils.py ``get_batch_defaults``; 2,048 on smaller GPUs, 16,384 from 160 GB). It is per engine
core, that is per DP rank, and decode tokens count against it. With the ``deepep_low_latency`` all-to-all backend,
EP and DP > 1 the default is 256 instead (``SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS_FOR_BATCHED_DP``); the
default backend is ``allgather_reducescatter`` (vllm/config/parallel.py), which keeps 8,192."""

VLLM_DEFAULT_MAX_NUM_SEQS = 1024
"""vLLM's ``--max-num-seqs`` on the same GPUs (``get_batch_defaults``; 256 on smaller GPUs), per engine core."""

VLLM_BLOCK_SIZE = 64
"""KV block size of vLLM serving DeepSeek-V3 on Hopper, tokens: with ``--block-size`` unset, an MLA model on the
FlashMLA backend (the default for MLA on SM90) is forced to 64-token blocks (vllm/platforms/cuda.py, "Forcing kv
cache block size to 64 for FlashMLA backend"). Used for vLLM's block admission and its prefix cache, which caches
whole blocks only."""

DEEPEP_LOW_LATENCY_US: tuple[tuple[int, float, float], ...] = (
    (8, 77.0, 114.0),
    (16, 118.0, 195.0),
    (32, 155.0, 273.0),
    (64, 173.0, 314.0),
    (128, 192.0, 369.0),
    (256, 194.0, 360.0),
)
"""DeepEP's published low-latency all-to-all per MoE layer, H800 with CX7 400 Gb/s, 128 tokens, hidden 7168, top-8,
FP8 dispatch and BF16 combine: (EP size, dispatch µs, combine µs) (deepseek-ai/DeepEP, the V1 page ``legacy.md``,
"Low-latency kernels with pure RDMA")."""


def sglang_chunk_per_rank(chunked_prefill_size: int | None, dp_size: int, enable_dp_attention: bool = True) -> int:
    """The prefill tokens one DP rank takes per step under SGLang: ``--chunked-prefill-size`` (default
    :data:`SGLANG_DEFAULT_CHUNKED_PREFILL_SIZE`) floor-divided by the DP size under DP attention
    (sglang/srt/arg_groups/parallel_hook.py: ``chunked_prefill_size // attn_dp_size``, logged as "chunked prefill
    size is adjusted"). At least 1.

    Raises:
        ValueError: ``dp_size < 1`` or a size below 1.
    """
    size = SGLANG_DEFAULT_CHUNKED_PREFILL_SIZE if chunked_prefill_size is None else chunked_prefill_size
    if dp_size < 1 or size < 1:
        raise ValueError(f"need dp_size >= 1 and chunked_prefill_size >= 1, got {dp_size}, {size}")
    return max(1, size // dp_size) if enable_dp_attention else size


def sglang_max_running_per_rank(
    max_running_requests: int | None, dp_size: int, kv_capacity_tokens: int, context_length: int
) -> int:
    """The most requests one DP rank holds under SGLang.

    Given ``--max-running-requests``: that over the DP size, at least 1, capped at half the rank's KV tokens. Unset:
    ``kv / context_length * 512`` clamped to 2,048-4,096, capped at half the rank's KV tokens
    (sglang/srt/mem_cache/kv_cache_configurator.py ``resolve_max_num_reqs``). With 600k KV tokens and DeepSeek-V3's
    163,840-token context that is 2,048.
    """
    if max_running_requests is not None:
        return max(1, min(max(1, max_running_requests // dp_size), kv_capacity_tokens // 2))
    estimated = max(min(int(kv_capacity_tokens / context_length * 512), 4096), 2048)
    return max(1, min(estimated, kv_capacity_tokens // 2))


def deepep_alltoall_per_layer_s(ep_size: int) -> float:
    """DeepEP low-latency dispatch + combine per MoE layer at ``ep_size`` GPUs, seconds.

    Read from :data:`DEEPEP_LOW_LATENCY_US` at the published EP sizes; between two of them interpolated linearly
    in ``log2(ep_size)`` (our interpolation, not a published figure); clamped to the table's ends outside 8-256
    (an EP group inside one NVLink node, below 8, is then overestimated).

    Raises:
        ValueError: ``ep_size < 1``.
    """
    if ep_size < 1:
        raise ValueError(f"ep_size must be >= 1, got {ep_size}")
    sizes = [row[0] for row in DEEPEP_LOW_LATENCY_US]
    totals = [row[1] + row[2] for row in DEEPEP_LOW_LATENCY_US]
    if ep_size <= sizes[0]:
        return totals[0] * 1e-6
    if ep_size >= sizes[-1]:
        return totals[-1] * 1e-6
    hi = bisect.bisect_left(sizes, ep_size)
    if sizes[hi] == ep_size:
        return totals[hi] * 1e-6
    lo = hi - 1
    t = (math.log2(ep_size) - math.log2(sizes[lo])) / (math.log2(sizes[hi]) - math.log2(sizes[lo]))
    return (totals[lo] + t * (totals[hi] - totals[lo])) * 1e-6


SGLANG_PREFILL_DELAYER_MAX_DELAY_PASSES = 30
"""SGLang's ``--prefill-delayer-max-delay-passes`` default, forward passes (sglang/srt/arg_groups/fields/schedule.py;
``--enable-prefill-delayer`` itself defaults to False)."""

SGLANG_HELD_PASS_S = 0.001
"""Duration of a scheduler pass in which SGLang's PrefillDelayer holds prefill and no rank has anything to run,
seconds: assumed, not measured. Such a pass runs no forward (with DP attention the ranks run idle batches only when
some rank has a batch); it costs the delayer's all-gather over the CPU (gloo) group of the DP ranks and one turn of
the scheduler loop (sglang/srt/managers/prefill_delayer.py, ``cpu_group``), a millisecond at most on one host,
against the ~11 ms all-to-all of a forward pass at EP 8."""

SGLANG_PREFILL_DELAYER_MAX_PREFILL_BS_WINDOW = 16
"""Prefill attempts over which SGLang's PrefillDelayer takes its largest recent prefill batch, ``max_prefill_bs``
(``SGLANG_PREFILL_DELAYER_MAX_PREFILL_BS_WINDOW_SIZE``, sglang/srt/environ.py; ``RecentPrefillBatchSizeTracker`` in
sglang/srt/managers/prefill_delayer.py)."""

VLLM_RECOMMENDED_PREFILL_SCHEDULE_INTERVAL = 2
"""The ``--prefill-schedule-interval`` vLLM PR #44558 found best on DeepSeek-R1 at DP 8 with EP (the default is 1,
off)."""
