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
- step time of the whole instance = ``alltoall_s + max over ranks(per-rank work) + mean over ranks(EP-shared
  work)``; the EP-shared part is ``routed_expert_fraction`` of the linear terms (0 in the idealised profile, so the
  step is the heaviest rank's work plus the all-to-all).

Which published figure sets the timescale: DeepSeek's *profile* prefill rate (7.8k tokens/s per H800, two-batch
overlap, 16k tokens per GPU per step) and its decode-instance step (55 ms). DeepSeek's production statistics of the
same overview (about 32.2k prompt tokens/s per node excluding cache hits, about 4k per GPU) are about 1.9x slower
on prefill; :meth:`EngineModelConfig.with_prefill_rate` rescales the prefill terms to such a rate
(``PRODUCTION_PREFILL_TOKENS_PER_S``) as a sensitivity point.

Two profiles (:meth:`EngineModelConfig.as_shipped`, the engines' own defaults and step rules, sources in
:mod:`gateway.sim.engine_defaults`; and the default ``EngineModelConfig()``, the *idealised* engine every figure so
far was computed with: 8,192 prefill tokens per rank per step beside all its decodes, a request joining the next
step, all work charged to its own rank, admission reserving the true output).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from gateway.sim.engine_defaults import (
    DEEPSEEK_V3_CONTEXT_LENGTH,
    SGLANG_DP_ATTENTION_CONSERVATIVENESS,
    SGLANG_PREFILL_DELAYER_MAX_DELAY_PASSES,
    VLLM_BLOCK_SIZE,
    VLLM_DEFAULT_MAX_NUM_BATCHED_TOKENS,
    VLLM_DEFAULT_MAX_NUM_SEQS,
    EngineFlavor,
    deepep_alltoall_per_layer_s,
    sglang_chunk_per_rank,
    sglang_max_running_per_rank,
)

DEEPEP_EP32_DISPATCH_S = 155e-6
"""DeepEP all-to-all dispatch latency per MoE layer at EP32, seconds (DeepEP README, H800)."""

DEEPEP_EP32_COMBINE_S = 273e-6
"""DeepEP all-to-all combine latency per MoE layer at EP32, seconds (DeepEP README, H800)."""

DEEPSEEK_V3_MOE_LAYERS = 58
"""Number of MoE layers of DeepSeek-V3 (61 layers, the first 3 dense; model card)."""

ROUTED_EXPERT_LINEAR_FRACTION = 20.43 / 35.59
"""Share of DeepSeek-V3's per-token linear (GEMM) work in its routed experts, fraction (about 0.574). Derived from
its config.json (hidden 7168, 61 layers of which 58 MoE, 8 of 256 routed experts active plus 1 shared, expert
intermediate 2048, dense intermediate 18432, MLA with q_lora 1536, kv_lora 512, 128 heads of 128 + 64 / 128):
routed 8 x 3 x 7168 x 2048 x 58 = 20.43 B active parameters; shared expert and dense FFN
3 x 7168 x 2048 x 58 + 3 x 3 x 7168 x 18432 = 3.74 B; attention projections
(7168 x 1536 + 1536 x 24576 + 7168 x 576 + 512 x 32768 + 16384 x 7168) x 61 = 11.41 B; 20.43 / 35.59 = 0.574.
Under expert parallelism a GPU runs its experts on the tokens routed to it from every rank, so this share of the
linear cost follows the mean tokens over the EP group, not the rank's own."""

PRODUCTION_PREFILL_TOKENS_PER_S = 4000.0
"""DeepSeek's production prefill rate per H800 GPU, prompt tokens/s (inference-system overview, Feb 2025: about
32.2k tokens/s per node excluding cache hits, 8 GPUs a node); a sensitivity point for
:meth:`EngineModelConfig.with_prefill_rate`."""

CALIBRATION_PROMPT_TOKENS = 4096
"""Prompt length of the prefill calibration point (DeepSeek: 4k-token prompts), tokens."""

CALIBRATION_STEP_TOKENS = 16384
"""Prefill tokens per GPU per step of the calibration point (DeepSeek: 16k), tokens."""

StepComposition = Literal["idealised", "sglang", "vllm"]
"""How a DP rank composes one step (see :class:`EngineModelConfig.step_composition`)."""

Admission = Literal["reserve_output", "sglang", "vllm"]
"""How a DP rank admits a waiting request (see :class:`EngineModelConfig.admission`)."""

Batching = Literal["default", "stall_free", "fairbatching"]
"""How a rank forms a mixed prefill/decode batch (see :class:`EngineModelConfig.batching`)."""

Role = Literal["mixed", "prefill", "decode"]
"""What an instance serves under P/D disaggregation (see :class:`EngineModelConfig.role`)."""

PdConnector = Literal["sglang", "vllm"]
"""Whose P/D KV handoff a prefill or decode instance follows (see :class:`EngineModelConfig.pd_connector`)."""

DEEPSEEK_V3_KV_BYTES_PER_TOKEN = (512 + 64) * 2 * 61
"""DeepSeek-V3's KV cache per token, bytes: MLA caches the compressed latent (``kv_lora_rank`` 512) and the decoupled
RoPE key (``qk_rope_head_dim`` 64) of every one of its 61 layers (``num_hidden_layers``), in BF16 (2 bytes);
DeepSeek-V3 config.json. 70,272 bytes, the "about 70 KB" of DeepSeek's inference-system overview."""

RDMA_NIC_BYTES_PER_S = 400e9 / 8
"""KV transfer bandwidth of one decode request's fetch, bytes/s: one 400 Gb/s RDMA NIC (ConnectX-7 class, as on
DeepSeek's H800 nodes: one 400 Gb/s InfiniBand NIC per GPU). An assumption: a transfer gets the whole NIC, with no
protocol overhead and no contention with other transfers."""

SGLANG_NUM_RESERVED_DECODE_TOKENS = 512
"""SGLang ``--num-reserved-decode-tokens`` default (0.5.23 ``sglang/srt/arg_groups/fields/disagg.py``), tokens."""

VLLM_NIXL_KV_LEASE_S = 30.0
"""vLLM NixlConnector ``kv_connector_extra_config.kv_lease_duration`` default, seconds (0.34
``distributed/kv_transfer/kv_connector/v1/nixl/base_scheduler.py``)."""

VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT_S = 480.0
"""vLLM MooncakeConnector ``VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT`` default, seconds (0.34 ``vllm/envs.py``): a
prefill frees blocks no decode has pulled after this long, and a pull waits this long for its prefill
(``mooncake/mooncake_connector.py``), unless ``kv_lease_duration`` is set (off by default)."""


def alltoall_s_for_ep(ep_size: int) -> float:
    """All-to-all latency per step at ``ep_size`` GPUs: 58 MoE layers x DeepEP low-latency dispatch + combine
    (:func:`gateway.sim.engine_defaults.deepep_alltoall_per_layer_s`, interpolated between published EP sizes),
    seconds. EP8: 11.1 ms; EP32: 24.8 ms."""
    return DEEPSEEK_V3_MOE_LAYERS * deepep_alltoall_per_layer_s(ep_size)


@dataclass(frozen=True)
class NewTokenRatio:
    """SGLang's estimate of how much of its ``max_new_tokens`` a running request will still use, for admission
    (sglang/srt/managers/scheduler_components/new_token_ratio_tracker.py and schedule_policy.py ``PrefillAdder``,
    environment defaults in sglang/srt/environ.py; SGLang 0.5.23).

    The ratio starts at ``min(init x conservativeness, 1)``, falls by ``(init - min) / decay_steps`` each decode
    step to ``init x min_factor``, returns to its start when the rank goes idle, and after a retraction is set to
    ``(decoded + retract_decode_steps x n) / (sum of max_new_tokens + 1)`` over the requests kept.
    """

    init: float = 0.7
    """``SGLANG_INIT_NEW_TOKEN_RATIO``, fraction."""
    min_factor: float = 0.14
    """``SGLANG_MIN_NEW_TOKEN_RATIO_FACTOR``, fraction of the initial ratio."""
    decay_steps: int = 600
    """``SGLANG_NEW_TOKEN_RATIO_DECAY_STEPS``, decode steps."""
    retract_decode_steps: int = 20
    """``SGLANG_RETRACT_DECODE_STEPS``, tokens per kept request in the post-retraction estimate."""
    clip_max_new_tokens: int = 4096
    """``SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION``: ``max_new_tokens`` is clipped to this for the estimate, tokens."""
    schedule_conservativeness: float = 1.0
    """``--schedule-conservativeness`` as the scheduler sees it (SGLang multiplies the flag by 0.3 under DP
    attention: :data:`gateway.sim.engine_defaults.SGLANG_DP_ATTENTION_CONSERVATIVENESS`)."""

    @property
    def start(self) -> float:
        """The ratio at start and after idle, fraction."""
        return min(self.init * self.schedule_conservativeness, 1.0)

    @property
    def floor(self) -> float:
        """The lowest the ratio decays to, fraction."""
        return min(self.start * self.min_factor, 1.0)

    @property
    def decay(self) -> float:
        """Fall per decode step, fraction."""
        return (self.start - self.floor) / self.decay_steps


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
    (DeepEP EP32 dispatch + combine) ≈ 24.8 ms, whatever the instance's EP size. Derived; the as-shipped
    profiles use the instance's own EP size (:func:`alltoall_s_for_ep`)."""

    max_prefill_tokens_per_step: int = 8192
    """Token budget of one rank's step, tokens: SGLang's per-rank chunk (``--chunked-prefill-size`` over the DP
    size under DP attention), vLLM's ``--max-num-batched-tokens`` (per DP rank). The idealised 8192 is a tuned
    setting, not SGLang's shipped 1,024 at DP 8; the calibration point above used 16384. Whether decode tokens
    count against it depends on ``step_composition`` (idealised: no)."""

    max_running_requests: int = 256
    """Most requests one rank holds at once (decoding plus admitted to prefill), requests (SGLang
    ``--max-running-requests`` over the DP size, vLLM ``--max-num-seqs``; 256 is vLLM's default on GPUs under
    70 GB, 1,024 on H100/H800: see :meth:`as_shipped`)."""

    kv_capacity_tokens: int = 600_000
    """KV cache capacity of one rank, tokens. Derived: ≈ 50 GB of HBM free for KV on an 80 GB H800 after
    the DP+EP weight shard, / ≈ 70 KB per token (DeepSeek) ≈ 700k; rounded down to 600k to stay
    conservative (activations, CUDA graphs and fragmentation take some of it)."""

    step_composition: StepComposition = "idealised"
    """What one rank's step holds. ``"idealised"``: every running request decodes *and* waiting requests prefill
    up to ``max_prefill_tokens_per_step``, decode tokens not counted. ``"sglang"``: a rank whose scheduler forms a
    prefill batch runs only that batch and its decodes wait the step ("Run prefill first if possible",
    sglang/srt/managers/scheduler.py ``get_next_batch_to_run``), unless ``enable_mixed_chunk``. ``"vllm"``: running
    requests first (decodes, then unfinished chunked prefills), then new requests, all under one budget of
    ``max_prefill_tokens_per_step`` tokens that counts decode tokens (vllm/v1/core/sched/scheduler.py
    ``Scheduler.schedule``)."""

    enable_mixed_chunk: bool = False
    """SGLang ``--enable-mixed-chunk`` (default False, sglang/srt/arg_groups/fields/schedule.py): a prefill step
    also decodes the rank's running requests, whose tokens are taken from the chunk budget (``PrefillAdder``:
    ``rem_chunk_tokens -= num_mixed_decode_tokens``). Only read with ``step_composition="sglang"``."""

    join_lag_steps: int = 0
    """Extra steps before a request that reaches a rank during step k may run: 0 joins k+1; 1 joins k+2, as under
    SGLang's overlap scheduler (``event_loop_overlap`` forms batch k+1 while batch k runs; on by default,
    ``--disable-overlap-schedule``) and vLLM's async scheduling (``step_with_batch_queue`` with a queue of 2;
    on by default, vllm/config/vllm.py). When nothing else would run in k+1 the request joins k+1 (see
    ``idle_rank_joins_next_step``)."""

    idle_rank_joins_next_step: bool = False
    """With ``join_lag_steps``: a rank with no work of its own in step k+1 takes a request arriving during k into
    k+1. vLLM (True): an engine core without requests runs its dummy batch synchronously
    (vllm/v1/engine/core.py ``DPEngineCoreProc.run_busy_loop``), so nothing was scheduled ahead. SGLang (False):
    DP attention turns an empty local batch into an IDLE batch that is launched ahead like any other, so the lag
    holds unless every rank of the instance is idle."""

    routed_expert_fraction: float = 0.0
    """Fraction 0-1 of the linear prefill cost (``prefill_token_s``) and per-request decode cost
    (``decode_req_s``) that follows the *mean* over the instance's ranks rather than the rank's own work: the routed
    experts, which under EP run on tokens from every rank. 0 charges everything to its own rank; the as-shipped
    profiles use :data:`ROUTED_EXPERT_LINEAR_FRACTION` (derived). A perfectly balanced step costs the same either
    way."""

    admission: Admission = "reserve_output"
    """When a rank admits a waiting request (it also needs a running slot under ``max_running_requests``).
    ``"reserve_output"``: its prompt plus its true output fit the unreserved KV, so nothing is ever preempted.
    ``"sglang"``: prompt plus ``min(max_new_tokens, clip)`` fit the free KV less the running requests' remaining
    ``max_new_tokens`` times ``new_token_ratio``; a decode step without room retracts requests (the fewest output
    tokens first, then the longest prompt) to the back of the queue (sglang/srt/managers/schedule_batch.py
    ``retract_decode``). ``"vllm"``: the KV blocks of the tokens scheduled this step fit the free blocks; a running
    request that cannot get a block preempts the newest running request (recompute: its KV is freed and it
    prefills prompt plus output so far again, from the front of the queue), and no new request is admitted in a
    step that preempted (vllm/v1/core/sched/scheduler.py ``schedule``, ``_preempt_request``). Neither engine
    knows the true output length."""

    kv_block_size: int = 1
    """KV allocation granularity for ``admission="vllm"``, tokens (vLLM: :data:`VLLM_BLOCK_SIZE`)."""

    new_token_ratio: NewTokenRatio = field(default_factory=NewTokenRatio)
    """SGLang's admission estimate, read with ``admission="sglang"``."""

    context_length: int = 131_072
    """``max_new_tokens`` the engine assumes for a request that gives no ``max_tokens``: the rest of this context,
    tokens (the mock engine's ``max_model_len``, DeepSeek-V3's 128k)."""

    enable_prefix_caching: bool = False
    """A prefix cache per DP rank (vLLM ``--enable-prefix-caching``, on by default: vllm/config/cache.py
    ``CacheConfig.enable_prefix_caching = True``; SGLang's radix cache, on unless ``--disable-radix-cache``:
    sglang/srt/arg_groups/fields/memory.py). Prompt blocks a request computed stay in its rank's KV cache after it
    leaves and a later request on the same rank whose prompt starts with them skips their prefill; blocks held by
    a request are never evicted, idle ones are evicted least recently used first when the rank's KV is needed.
    Granularity: the prompt block ids the driver passes (Mooncake's 512-token ``hash_ids`` in the simulator), each
    cached in whole ``kv_block_size`` blocks (see :meth:`gateway.sim.engine_model.EngineModel.add_request`).
    Off in the idealised profile."""

    enable_prefill_delayer: bool = False
    """SGLang ``--enable-prefill-delayer`` (default False; SGLang 0.5.23 sglang/srt/managers/prefill_delayer.py,
    flags in sglang/srt/arg_groups/fields/schedule.py). Before each pass the ranks all-gather whether each has a
    request it could admit to prefill. Some but not all ("mixed"): prefill is held on every rank (a rank part-way
    through a chunked prompt still continues it) for up to ``prefill_delayer_max_delay_passes - 1`` passes, then let
    through. All: held the same way while a rank's free running slots are fewer than the largest recent prefill batch
    (``max_running_requests - running < max_prefill_bs`` over the ranks, the last 16 prefill attempts), except the
    first time. SGLang refuses it without DP attention or with ``--disable-overlap-schedule``; the model does not."""

    prefill_delayer_max_delay_passes: int = SGLANG_PREFILL_DELAYER_MAX_DELAY_PASSES
    """SGLang ``--prefill-delayer-max-delay-passes`` (default 30): a hold lasts at most this many passes less one."""

    prefill_delayer_token_usage_low_watermark: float | None = None
    """SGLang ``--prefill-delayer-token-usage-low-watermark`` (default None = off), fraction 0-1: a rank that could
    prefill and whose KV usage is below it lets prefill through on every rank at once."""

    prefill_schedule_interval: int = 1
    """vLLM ``--prefill-schedule-interval`` (default 1 = off; vLLM 0.34.0 vllm/config/scheduler.py, PR #44558, which
    found 2 best): with N > 1 a rank that has requests decoding runs no prefill at all (neither new requests nor
    chunks of admitted ones) on steps whose index within the busy period is not a multiple of N, the same steps on
    every rank (``DPEngineCoreProc._should_throttle_prefills``: the DP-synchronised ``step_counter``, reset when the
    instance goes idle). A rank whose last prefill-carrying step left requests waiting is not held until a
    prefill-carrying step drains its queue (``prefill_capacity_bound``, vllm/v1/core/sched/scheduler.py). On one rank
    (``dp_size == 1``) vLLM counts N executed steps from the last prefill-carrying step instead."""

    batching: Batching = "default"
    """How a rank forms a batch of decodes and prefill. ``"default"``: as ``step_composition`` says.
    ``"stall_free"``: Sarathi-Serve's stall-free batching (Agrawal et al., OSDI 2024): every running request decodes
    first, then prefill chunks fill what is left of one token budget, ``max_prefill_tokens_per_step``, that counts the
    decode tokens; this is the step vLLM ships (``step_composition="vllm"``), which it reuses, so with the vLLM profile
    it changes nothing. ``"fairbatching"``: our reading of FairBatching (Lyu et al., arXiv 2510.14392; only its
    abstract and third-party summaries were readable): token j of a request is due at ``arrival + ttft_slo_s + j x
    tpot_slo_s``; a step's *time* budget replaces the token budget and is the least slack (due time of the next token
    less now) over the instance's decoding requests, between ``tpot_slo_s`` and half of ``ttft_slo_s`` (our bounds;
    half the TTFT objective when nothing decodes, so that a request arriving during a step can still be prefilled in
    the next within its objective); decodes due before the budget plus one ``tpot_slo_s`` always run, prefill fills
    the rest of the budget FCFS, and decodes with more slack run only in the time prefill leaves (prefill takes time
    from decodes that have slack, never from the others). Time is the engine's own step cost (an exact estimator,
    which FairBatching fits); arrival is when the request reached the engine, on the engine's clock (the sum of its
    step times). Neither is available with SGLang's admission (``--enable-mixed-chunk`` is SGLang's stall-free
    batching); FairBatching needs ``admission="reserve_output"``."""

    ttft_slo_s: float = 2.0
    """FairBatching's TTFT objective, seconds (read with ``batching="fairbatching"``)."""

    tpot_slo_s: float = 0.1
    """FairBatching's TPOT objective, seconds (read with ``batching="fairbatching"``)."""

    role: Role = "mixed"
    """What the instance serves (rules in :mod:`gateway.sim.engine.pd`). ``"mixed"``: prefill and decode, no KV
    handoff (every figure so far). ``"prefill"``: a request added with ``hold_kv`` finishes at its first token and
    keeps its KV on its rank until the decode side has fetched it
    (:meth:`~gateway.sim.engine_model.EngineModel.release_held`) or its lease (``kv_lease_s``) expires; SGLang frees
    it when the transfer completes or fails (0.5.23 ``disaggregation/prefill.py``,
    ``process_disagg_prefill_inflight_queue``), vLLM's NixlConnector when the decode side has read it or its lease
    expires. ``"decode"``: a request added with ``remote_prefill`` first waits in the rank's pre-allocation queue for
    a KV reservation (``pd_connector`` says which rule), then fetches its prompt's KV once the prefill side has it
    (:meth:`~gateway.sim.engine_model.EngineModel.kv_ready`) in ``prompt_tokens * kv_bytes_per_token /
    kv_transfer_bytes_per_s`` seconds, then decodes with no prefill compute."""

    pd_connector: PdConnector = "sglang"
    """Whose P/D handoff the instance follows (read with ``role`` prefill or decode). ``"sglang"``: a decode rank
    reserves KV as SGLang 0.5.23's ``DecodePreallocQueue`` does under the default
    ``--disaggregation-decode-allocation-policy early`` (``disaggregation/decode.py`` ``_required_admission_tokens``,
    ``_allocatable_token_budgets``): it needs ``max(prompt + R, prompt + min(max_new_tokens, clip) - retractable)``
    tokens of ``free - max(R x active requests, space for the largest running request)``, R =
    ``num_reserved_decode_tokens``, ``retractable`` the running requests' prompt and output tokens; the first output
    token comes from the prefill with the KV. ``"vllm"``: the prompt's KV blocks must fit the free blocks (vLLM 0.34
    ``vllm/v1/core/sched/scheduler.py``: a request loading KV asynchronously gets its blocks and waits as
    ``WAITING_FOR_REMOTE_KVS``), and the decode computes the first output token itself. Both also need a running
    slot under ``max_running_requests``."""

    kv_bytes_per_token: int = DEEPSEEK_V3_KV_BYTES_PER_TOKEN
    """KV cache per token moved from prefill to decode, bytes (:data:`DEEPSEEK_V3_KV_BYTES_PER_TOKEN`)."""

    kv_transfer_bytes_per_s: float = RDMA_NIC_BYTES_PER_S
    """Bandwidth of one KV transfer, bytes/s (:data:`RDMA_NIC_BYTES_PER_S`, an assumption)."""

    num_reserved_decode_tokens: int = SGLANG_NUM_RESERVED_DECODE_TOKENS
    """SGLang's per-request decode reservation, tokens (:data:`SGLANG_NUM_RESERVED_DECODE_TOKENS`; read with
    ``pd_connector="sglang"``)."""

    kv_lease_s: float | None = None
    """How long a prefill rank keeps a finished request's KV for the decode side, seconds; None keeps it until it is
    fetched or the request is aborted (SGLang: the prefill server times out the handoff itself after
    ``SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT``, 300 s). vLLM's NixlConnector: :data:`VLLM_NIXL_KV_LEASE_S`; its
    MooncakeConnector: :data:`VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT_S`."""

    def __post_init__(self) -> None:
        for name in ("prefill_token_s", "prefill_attn_s", "decode_req_s", "decode_kv_s", "alltoall_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in (
            "max_prefill_tokens_per_step",
            "max_running_requests",
            "kv_capacity_tokens",
            "kv_block_size",
            "context_length",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.join_lag_steps not in (0, 1):
            raise ValueError(f"join_lag_steps must be 0 or 1, got {self.join_lag_steps}")
        if self.admission != "reserve_output" and self.admission != self.step_composition:
            raise ValueError(
                f"admission={self.admission!r} needs step_composition={self.admission!r} (its preemption or "
                f"retraction runs in that engine's step), got {self.step_composition!r}"
            )
        if not 0.0 <= self.routed_expert_fraction <= 1.0:
            raise ValueError(f"routed_expert_fraction must be in [0, 1], got {self.routed_expert_fraction}")
        if self.prefill_delayer_max_delay_passes < 1 or self.prefill_schedule_interval < 1:
            raise ValueError(
                "prefill_delayer_max_delay_passes and prefill_schedule_interval must be >= 1, got "
                f"{self.prefill_delayer_max_delay_passes}, {self.prefill_schedule_interval}"
            )
        if self.batching != "default" and self.admission == "sglang":
            raise ValueError(
                f"batching={self.batching!r} needs vLLM's or the idealised admission (SGLang's stall-free batching is "
                "enable_mixed_chunk)"
            )
        if self.batching == "fairbatching" and self.admission != "reserve_output":
            raise ValueError("batching='fairbatching' needs admission='reserve_output' (no preemption in its step)")
        if self.ttft_slo_s <= 0 or self.tpot_slo_s <= 0:
            raise ValueError(f"ttft_slo_s and tpot_slo_s must be > 0, got {self.ttft_slo_s}, {self.tpot_slo_s}")
        if self.role not in ("mixed", "prefill", "decode") or self.pd_connector not in ("sglang", "vllm"):
            raise ValueError(f"role and pd_connector: unknown {self.role!r}, {self.pd_connector!r}")
        if self.kv_bytes_per_token < 1 or self.kv_transfer_bytes_per_s <= 0 or self.num_reserved_decode_tokens < 0:
            raise ValueError(
                "kv_bytes_per_token must be >= 1, kv_transfer_bytes_per_s > 0 and num_reserved_decode_tokens >= 0, got "
                f"{self.kv_bytes_per_token}, {self.kv_transfer_bytes_per_s}, {self.num_reserved_decode_tokens}"
            )
        if self.kv_lease_s is not None and self.kv_lease_s <= 0:
            raise ValueError(f"kv_lease_s must be > 0 or None, got {self.kv_lease_s}")
        watermark = self.prefill_delayer_token_usage_low_watermark
        if watermark is not None and not 0.0 <= watermark <= 1.0:
            raise ValueError(f"prefill_delayer_token_usage_low_watermark must be in [0, 1], got {watermark}")

    @classmethod
    def as_shipped(
        cls,
        flavor: EngineFlavor,
        dp_size: int,
        *,
        chunked_prefill_size: int | None = None,
        max_num_batched_tokens: int | None = None,
        max_running_requests: int | None = None,
        max_num_seqs: int | None = None,
        enable_mixed_chunk: bool = False,
        schedule_conservativeness: float = 1.0,
        disable_overlap_schedule: bool = False,
        async_scheduling: bool = True,
        disable_radix_cache: bool = False,
        enable_prefix_caching: bool = True,
        enable_prefill_delayer: bool = False,
        prefill_schedule_interval: int = 1,
    ) -> EngineModelConfig:
        """The engine model as ``flavor`` ships it on ``dp_size`` H800 GPUs with DP attention and EP over all of
        them, given that engine's own flags (``None`` = its default; a flag of the other engine is refused).

        Both: all-to-all by EP size (:func:`alltoall_s_for_ep`), :data:`ROUTED_EXPERT_LINEAR_FRACTION` of the linear
        cost shared over the EP group, join lag 1 (overlap / async scheduling on), the idealised timing constants
        (see the module docstring for the timescale). SGLang: ``--chunked-prefill-size`` over the DP size per rank,
        prefill-or-decode steps, new-token-ratio admission with conservativeness x 0.3, ``--max-running-requests``
        over the DP size. vLLM: ``--max-num-batched-tokens`` (8,192) per rank counting decodes, decode-first mixed
        steps, block admission with preemption, ``--max-num-seqs`` (1,024) per rank. Both: a prefix cache per rank
        (``enable_prefix_caching``) unless SGLang's ``--disable-radix-cache`` or vLLM's
        ``--no-enable-prefix-caching``. The engines' own prefill alignment is off unless asked for: SGLang's
        ``--enable-prefill-delayer`` (:attr:`enable_prefill_delayer`, its other options at their defaults) and
        vLLM's ``--prefill-schedule-interval`` (:attr:`prefill_schedule_interval`). Sources:
        :mod:`gateway.sim.engine_defaults`.

        Raises:
            ValueError: unknown flavour, ``dp_size < 1``, or a flag of the other engine.
        """
        if dp_size < 1:
            raise ValueError(f"dp_size must be >= 1, got {dp_size}")
        base = replace(
            cls(), alltoall_s=alltoall_s_for_ep(dp_size), routed_expert_fraction=ROUTED_EXPERT_LINEAR_FRACTION
        )
        if flavor == "sglang":
            if max_num_batched_tokens is not None or max_num_seqs is not None or not async_scheduling:
                raise ValueError("--max-num-batched-tokens, --max-num-seqs and async scheduling are vLLM settings")
            if not enable_prefix_caching:
                raise ValueError("--no-enable-prefix-caching is a vLLM setting (SGLang: --disable-radix-cache)")
            if prefill_schedule_interval != 1:
                raise ValueError("--prefill-schedule-interval is a vLLM setting (SGLang: --enable-prefill-delayer)")
            return replace(
                base,
                enable_prefix_caching=not disable_radix_cache,
                max_prefill_tokens_per_step=sglang_chunk_per_rank(chunked_prefill_size, dp_size, dp_size > 1),
                max_running_requests=sglang_max_running_per_rank(
                    max_running_requests, dp_size, base.kv_capacity_tokens, DEEPSEEK_V3_CONTEXT_LENGTH
                ),
                step_composition="sglang",
                enable_mixed_chunk=enable_mixed_chunk,
                join_lag_steps=0 if disable_overlap_schedule else 1,
                idle_rank_joins_next_step=False,
                admission="sglang",
                enable_prefill_delayer=enable_prefill_delayer,
                new_token_ratio=NewTokenRatio(
                    schedule_conservativeness=schedule_conservativeness
                    * (SGLANG_DP_ATTENTION_CONSERVATIVENESS if dp_size > 1 else 1.0)
                ),
            )
        if flavor == "vllm":
            if chunked_prefill_size is not None or max_running_requests is not None or enable_mixed_chunk:
                raise ValueError(
                    "--chunked-prefill-size, --max-running-requests and --enable-mixed-chunk are SGLang settings"
                )
            if (
                disable_overlap_schedule
                or schedule_conservativeness != 1.0
                or disable_radix_cache
                or enable_prefill_delayer
            ):
                raise ValueError(
                    "--disable-overlap-schedule, --schedule-conservativeness, --disable-radix-cache and "
                    "--enable-prefill-delayer are SGLang settings"
                )
            return replace(
                base,
                enable_prefix_caching=enable_prefix_caching,
                max_prefill_tokens_per_step=max_num_batched_tokens or VLLM_DEFAULT_MAX_NUM_BATCHED_TOKENS,
                max_running_requests=max_num_seqs or VLLM_DEFAULT_MAX_NUM_SEQS,
                step_composition="vllm",
                join_lag_steps=1 if async_scheduling else 0,
                idle_rank_joins_next_step=True,
                admission="vllm",
                kv_block_size=VLLM_BLOCK_SIZE,
                prefill_schedule_interval=prefill_schedule_interval,
            )
        raise ValueError(f"flavor must be 'sglang' or 'vllm', got {flavor!r}")

    def calibration_prefill_tokens_per_s(self) -> float:
        """Prefill tokens/s of one rank at the calibration point: ``CALIBRATION_STEP_TOKENS`` tokens a step of
        ``CALIBRATION_PROMPT_TOKENS``-token prompts, each step paying the all-to-all."""
        prompts = CALIBRATION_STEP_TOKENS // CALIBRATION_PROMPT_TOKENS
        step = self.alltoall_s + prompts * self.prefill_chunk_s(CALIBRATION_PROMPT_TOKENS, 0)
        return CALIBRATION_STEP_TOKENS / step

    def with_prefill_rate(self, tokens_per_s: float) -> EngineModelConfig:
        """This configuration with both prefill terms scaled by one factor so that the calibration point runs at
        ``tokens_per_s`` per rank (e.g. :data:`PRODUCTION_PREFILL_TOKENS_PER_S`); decode is unchanged.

        Raises:
            ValueError: a rate the all-to-all alone already exceeds, or not positive.
        """
        if tokens_per_s <= 0:
            raise ValueError(f"tokens_per_s must be > 0, got {tokens_per_s}")
        prompts = CALIBRATION_STEP_TOKENS // CALIBRATION_PROMPT_TOKENS
        work = prompts * self.prefill_chunk_s(CALIBRATION_PROMPT_TOKENS, 0)
        target_work = CALIBRATION_STEP_TOKENS / tokens_per_s - self.alltoall_s
        if target_work <= 0:
            raise ValueError(f"{tokens_per_s} tokens/s is beyond what the all-to-all alone allows")
        factor = target_work / work
        return replace(self, prefill_token_s=self.prefill_token_s * factor, prefill_attn_s=self.prefill_attn_s * factor)

    def prefill_chunk_s(self, chunk_tokens: int, context_tokens: int) -> float:
        """Seconds one rank spends prefilling ``chunk_tokens`` new tokens after ``context_tokens`` tokens
        already in the request's KV cache (formula in the module docstring)."""
        c = chunk_tokens
        return self.prefill_token_s * c + self.prefill_attn_s * c * (context_tokens + c / 2)

    def kv_transfer_s(self, prompt_tokens: int) -> float:
        """Seconds to move the KV of ``prompt_tokens`` tokens from a prefill rank to a decode rank."""
        return prompt_tokens * self.kv_bytes_per_token / self.kv_transfer_bytes_per_s

    def decode_s(self, running_requests: int, kv_tokens: int) -> float:
        """Seconds one rank spends on one decode token for ``running_requests`` requests holding
        ``kv_tokens`` KV tokens in total."""
        return self.decode_req_s * running_requests + self.decode_kv_s * kv_tokens
