"""A discrete-step model of one DP+EP engine instance: ``dp_size`` DP ranks running steps in lockstep.

Pure and synchronous: no I/O, no asyncio, no clock. :meth:`EngineModel.step` plans and commits one forward
step of the whole instance and returns how long it took (engine seconds) and which output tokens it
produced; whoever drives the model (the HTTP mock engine in real time, a simulator in virtual time) owns
the clock. Deterministic: the same calls give the same results.

Per DP rank (docs/design.md §1 and §5; constants, formulas and every option's source in
:mod:`gateway.sim.calibration`):

- a FCFS *waiting* queue of requests not yet fully prefilled and a *running* set of decoding requests;
- a step's content follows ``step_composition``: idealised (every running request decodes one token and waiting
  requests prefill FCFS up to the budget, chunking a long prompt over several steps), SGLang (prefill *or* decode,
  or both with ``enable_mixed_chunk``) or vLLM (running requests first, then new ones, under one token budget);
- a waiting request is *admitted* (may start prefill) under ``max_running_requests`` and the ``admission`` rule:
  idealised, its prompt plus its true output fit the unreserved KV (so nothing is ever preempted); SGLang's
  new-token ratio with retraction; vLLM's block allocation with preemption. A request admission refuses blocks
  everything behind it (head-of-line blocking);
- a preempted or retracted request loses its KV and prefills its prompt plus its output so far again;
- the step that completes a request's prefill emits its next output token (the first, unless it was preempted);
  each later step that decodes it emits one; a request that has produced its ``output_tokens`` finishes and
  frees its KV;
- with ``join_lag_steps`` a request reaching a rank while a step runs joins the step after next;
- the engines' own prefill alignment, off by default, gates what prefill a rank may run in a step: SGLang's
  PrefillDelayer (all ranks hold new prefill together for a bounded number of passes until every rank can prefill)
  and vLLM's ``prefill_schedule_interval`` (a rank with decodes prefills only on every Nth step, the same steps on
  every rank).

Instance step time = ``alltoall_s + max over ranks(own work) + mean over ranks(EP-shared work)``: a rank with
nothing to do runs a dummy step and waits for the slowest. With no work on any rank there is no step.

The step is built in three stages, each a method, so that more engine behaviour (a prefix cache per rank, the
engines' own prefill alignment, other batch formation) plugs in as one more option: which waiting requests a
rank may consider (:meth:`EngineModel._join_limits`) and what prefill it may run (:meth:`EngineModel._prefill_gates`),
what each rank runs (``_step_<composition>``, using
``_prefill`` and the admission rules), and the cost of the lockstep step (:meth:`EngineModel._duration`).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.sim.calibration import EngineModelConfig
from gateway.sim.engine_defaults import SGLANG_PREFILL_DELAYER_MAX_PREFILL_BS_WINDOW
from gateway.types import PREFIX_BLOCK_TOKENS

PrefillGate = Literal["open", "admitted", "closed"]
"""What prefill a rank may run in a step: any (``open``), only requests already admitted, i.e. the rest of a chunked
prompt (``admitted``), or none (``closed``)."""


@dataclass(frozen=True)
class TokenEvent:
    """One output token produced by a step.

    Attributes:
        request_id: the request it belongs to.
        rank: the DP rank that produced it.
        index: 0-based index of the token among the request's output tokens (0 = first token).
        finished: True when this is the request's last token (the request has left the model).
    """

    request_id: str
    rank: int
    index: int
    finished: bool


@dataclass(frozen=True)
class StepResult:
    """What one lockstep step did.

    Attributes:
        duration_s: engine time of the step, seconds (0.0 when there was no work and so no step).
        tokens: the output tokens produced at the end of the step, rank by rank.
        prefill_tokens_per_rank: new prompt tokens prefilled by each rank, length ``dp_size``.
        decode_reqs_per_rank: requests decoded by each rank, length ``dp_size``.
        work_s_per_rank: each rank's work, seconds, excluding all-to-all, length ``dp_size``: its own work plus
            the mean EP-shared work; the gap to the maximum is that rank's idle (bubble) time.
    """

    duration_s: float
    tokens: list[TokenEvent]
    prefill_tokens_per_rank: list[int]
    decode_reqs_per_rank: list[int]
    work_s_per_rank: list[float]


@dataclass(frozen=True)
class RankStats:
    """A snapshot of one DP rank between steps.

    Attributes:
        rank: the DP rank.
        running: requests decoding (prefill complete).
        waiting: requests not yet fully prefilled (queued or part-way through a chunked prefill).
        waiting_prompt_tokens: prompt tokens still to prefill over the waiting requests, tokens.
        kv_used_tokens: tokens held in the rank's KV cache (prefilled prompt + generated), tokens.
        kv_capacity_tokens: the rank's KV capacity, tokens.
        kv_usage: ``kv_used_tokens / kv_capacity_tokens``, fraction 0–1.
        preemptions: requests preempted (vLLM) or retracted (SGLang) on the rank so far.
        new_token_ratio: SGLang's current new-token ratio on the rank (admission estimate), fraction 0-1.
        prefix_cache_queries: prompt tokens of the requests the rank admitted that looked up its prefix cache, not
            counting re-admissions after a preemption (vLLM's ``vllm:prefix_cache_queries``), tokens.
        prefix_cache_hits: of those, the tokens found in the cache (``vllm:prefix_cache_hits``), tokens.
        cache_hit_rate: SGLang's ``sglang:cache_hit_rate``: cached tokens over cached plus prefilled tokens of the
            rank's latest step that prefilled, fraction 0-1.
        prefix_cache_tokens: tokens the rank's prefix cache holds, referenced by requests or idle, tokens.
    """

    rank: int
    running: int
    waiting: int
    waiting_prompt_tokens: int
    kv_used_tokens: int
    kv_capacity_tokens: int
    kv_usage: float
    preemptions: int = 0
    new_token_ratio: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    cache_hit_rate: float = 0.0
    prefix_cache_tokens: int = 0


@dataclass(eq=False, slots=True)
class _Request:
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
    cache_refs: list[_CachedBlock] = field(default_factory=list)  # cached blocks it holds a reference on
    cache_next: int = 0  # index of the next prompt block to insert into the cache
    arrival_s: float = 0.0  # on the engine's clock (FairBatching's deadlines)

    @property
    def kv_reservation(self) -> int:
        return self.prompt_tokens + self.output_tokens


@dataclass(eq=False, slots=True)
class _CachedBlock:
    """One prompt block in a rank's prefix cache: its id, KV tokens and KV blocks, the requests holding it, and
    the first step that may hit it (the step after the one that computed it)."""

    key: int
    tokens: int
    blocks: int
    ready_step: int
    refs: int = 0


@dataclass(eq=False)
class _PrefixCache:
    """A rank's prefix cache: every cached block by id, the unreferenced ones in eviction order (least recently
    used first), and the hit counters the engines export."""

    blocks: dict[int, _CachedBlock] = field(default_factory=dict)
    idle: OrderedDict[int, _CachedBlock] = field(default_factory=OrderedDict)
    idle_tokens: int = 0
    idle_blocks: int = 0
    queries: int = 0
    hits: int = 0
    batch_step: int = -1  # the step whose hits and prefilled tokens are being summed
    batch_hits: int = 0
    batch_input: int = 0
    hit_rate: float = 0.0  # SGLang's gauge, from the latest finished step that prefilled
    tokens: int = 0  # tokens of every cached block, referenced or idle


@dataclass(eq=False)
class _Rank:
    new_token_ratio: float
    waiting: dict[str, _Request] = field(default_factory=dict)  # insertion order = FCFS
    running: dict[str, _Request] = field(default_factory=dict)  # insertion order = prefill completion
    kv_used: int = 0
    kv_blocks: int = 0
    kv_reserved: int = 0
    admitted: int = 0  # running + admitted waiting
    preemptions: int = 0
    cache: _PrefixCache | None = None
    recent_prefill_bs: deque[int] = field(
        default_factory=lambda: deque(maxlen=SGLANG_PREFILL_DELAYER_MAX_PREFILL_BS_WINDOW)
    )  # SGLang PrefillDelayer: requests per recent prefill attempt
    prefill_capacity_bound: bool = False  # vLLM: its last prefill-carrying step left requests waiting


@dataclass(slots=True)
class _RankStep:
    """What one rank did in a step: seconds of work, the part of it that is linear (for EP sharing), prompt
    tokens prefilled, requests decoded, tokens emitted."""

    work_s: float = 0.0
    linear_s: float = 0.0
    prefill_tokens: int = 0
    prefill_reqs: int = 0
    decoded: int = 0
    tokens: list[TokenEvent] = field(default_factory=list)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class EngineModel:
    """One engine instance of ``dp_size`` DP ranks (see the module docstring for the rules).

    Args:
        config: per-rank timing, capacity and engine behaviour.
        dp_size: number of DP ranks (>= 1).

    Raises:
        ValueError: if ``dp_size < 1``.
    """

    def __init__(self, config: EngineModelConfig, dp_size: int) -> None:
        if dp_size < 1:
            raise ValueError(f"dp_size must be >= 1, got {dp_size}")
        self.config = config
        self.dp_size = dp_size
        self._ranks = [_Rank(config.new_token_ratio.start) for _ in range(dp_size)]
        if config.enable_prefix_caching:
            for rank in self._ranks:
                rank.cache = _PrefixCache()
        self._requests: dict[str, _Request] = {}
        self._next_round_robin = 0
        self._steps = 0  # steps run so far; the index of the next one
        self._in_step = False  # the last step() call handed out a step the driver is still running
        self._admissions = 0
        self._delayed_passes: int | None = None  # SGLang PrefillDelayer: passes held so far (None = not holding)
        self._skip_first_delay = True  # SGLang PrefillDelayer: the first slot-condition hold is skipped
        self._delayer_attempts = [0] * dp_size  # SGLang PrefillDelayer: this pass's attempted prefill batch per rank
        self._busy_steps = 0  # steps since the instance was last idle (vLLM's DP step_counter)
        self._last_prefill_step = -config.prefill_schedule_interval  # vLLM's local cadence (one rank)
        self._clock_s = 0.0  # engine time at the start of the next step: the sum of step durations

    def add_request(
        self,
        request_id: str,
        rank: int,
        prompt_tokens: int,
        output_tokens: int,
        *,
        max_new_tokens: int | None = None,
        ignore_eos: bool = False,
        prefix_blocks: Sequence[int] = (),
        prefix_block_tokens: int = PREFIX_BLOCK_TOKENS,
    ) -> None:
        """Queue a request on a DP rank; it joins at the next step (the one after with ``join_lag_steps`` while a
        step runs).

        Args:
            request_id: unique among the requests in the model.
            rank: DP rank, ``0 <= rank < dp_size``.
            prompt_tokens: prompt length, tokens (>= 1).
            output_tokens: exact number of output tokens to generate (>= 1); only the step loop knows it.
            max_new_tokens: the request's ``max_tokens`` as the engine sees it, what admission may assume; None
                means the rest of ``config.context_length``.
            ignore_eos: the request asked to ignore end-of-sequence (SGLang then reserves its whole
                ``max_new_tokens``).
            prefix_blocks: the prompt's block ids, one per ``prefix_block_tokens`` tokens (the last block may be
                partial), chained: equal ids at position ``i`` mean equal prompts up to the end of block ``i``
                (Mooncake's ``hash_ids``, or hashes of token blocks). Read only with
                ``config.enable_prefix_caching`` (see :meth:`_cache_hit`); empty means nothing can be shared.
            prefix_block_tokens: tokens per prefix block (Mooncake: 512), a multiple of ``config.kv_block_size``.

        Raises:
            ValueError: bad rank, duplicate id, non-positive lengths, or a request whose prompt plus
                output exceeds one rank's KV capacity (it could never be admitted).
        """
        cfg = self.config
        if not 0 <= rank < self.dp_size:
            raise ValueError(f"rank must be in [0, {self.dp_size}), got {rank}")
        if request_id in self._requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        if prompt_tokens < 1 or output_tokens < 1:
            raise ValueError(f"prompt_tokens and output_tokens must be >= 1, got {prompt_tokens}, {output_tokens}")
        if prompt_tokens + output_tokens > cfg.kv_capacity_tokens:
            raise ValueError(
                f"prompt_tokens + output_tokens = {prompt_tokens + output_tokens} exceeds the KV capacity "
                f"of a rank ({cfg.kv_capacity_tokens} tokens)"
            )
        if max_new_tokens is None:
            max_new_tokens = max(1, cfg.context_length - prompt_tokens)
        ready = self._steps + (cfg.join_lag_steps if self._in_step else 0)
        req = _Request(request_id, rank, prompt_tokens, output_tokens, max_new_tokens, ignore_eos, ready, prompt_tokens)
        if self.config.enable_prefix_caching and prefix_blocks:
            if prefix_block_tokens < 1 or prefix_block_tokens % cfg.kv_block_size:
                raise ValueError(
                    f"prefix_block_tokens must be a positive multiple of kv_block_size ({cfg.kv_block_size}), "
                    f"got {prefix_block_tokens}"
                )
            req.prefix_blocks = tuple(prefix_blocks)
            req.prefix_block_tokens = prefix_block_tokens
        req.arrival_s = self._clock_s
        self._requests[request_id] = req
        self._ranks[rank].waiting[request_id] = req

    def abort(self, request_id: str) -> bool:
        """Remove a request wherever it is and free its KV. Returns True if it was in the model."""
        req = self._requests.get(request_id)
        if req is None:
            return False
        rank = self._ranks[req.rank]
        rank.waiting.pop(request_id, None)
        rank.running.pop(request_id, None)
        self._release(rank, req)
        return True

    def has_work(self) -> bool:
        """True if any rank has a waiting or running request (so :meth:`step` would run a step)."""
        return any(r.waiting or r.running for r in self._ranks)

    def step(self) -> StepResult:
        """Plan and commit one lockstep step of all ranks; returns its duration and output tokens.

        With no work anywhere, returns a zero-duration result with no tokens (no step happened).
        """
        n = self.dp_size
        if not self.has_work():
            self._in_step = False
            self._busy_steps = 0  # vLLM: a new DP wave starts with step_counter 0
            for rank in self._ranks:
                rank.new_token_ratio = self.config.new_token_ratio.start  # SGLang resets it when idle
            return StepResult(0.0, [], [0] * n, [0] * n, [0.0] * n)
        limits = self._join_limits()
        gates = self._prefill_gates(limits)
        composition = self.config.step_composition
        batching = self.config.batching
        budget_s = self._fairbatching_budget_s() if batching == "fairbatching" else 0.0
        steps: list[_RankStep] = []
        for rank, limit, gate in zip(self._ranks, limits, gates, strict=True):
            if batching == "fairbatching":
                steps.append(self._step_fairbatching(rank, limit, gate, budget_s))
            elif batching == "stall_free":
                steps.append(self._step_vllm(rank, limit, gate))
            elif composition == "idealised":
                steps.append(self._step_idealised(rank, limit, gate))
            elif composition == "sglang":
                steps.append(self._step_sglang(rank, limit, gate))
            else:
                steps.append(self._step_vllm(rank, limit, gate))
        self._after_prefill_gates(gates, limits, steps)
        self._steps += 1
        self._busy_steps += 1
        self._in_step = True
        duration, work = self._duration(steps)
        self._clock_s += duration
        tokens = [t for s in steps for t in s.tokens]
        return StepResult(duration, tokens, [s.prefill_tokens for s in steps], [s.decoded for s in steps], work)

    def rank_stats(self) -> list[RankStats]:
        """Per-rank snapshot, index = DP rank."""
        cap = self.config.kv_capacity_tokens
        return [
            RankStats(
                rank=i,
                running=len(r.running),
                waiting=len(r.waiting),
                waiting_prompt_tokens=sum(q.prefill_target - q.prefilled for q in r.waiting.values()),
                kv_used_tokens=r.kv_used,
                kv_capacity_tokens=cap,
                kv_usage=r.kv_used / cap,
                preemptions=r.preemptions,
                new_token_ratio=r.new_token_ratio,
                **self._cache_stats(r),
            )
            for i, r in enumerate(self._ranks)
        ]

    def pick_rank_vllm(self) -> int:
        """vLLM's internal DP load balancing: the rank with the least ``waiting * 4 + running``, lowest
        rank on ties (vLLM V1 ``DPLBAsyncMPClient.get_core_engine_for_request``, vllm/v1/engine/
        core_client.py)."""
        scores = [len(r.waiting) * 4 + len(r.running) for r in self._ranks]
        return scores.index(min(scores))

    def pick_rank_round_robin(self) -> int:
        """SGLang's default DP dispatch (``--load-balance-method round_robin``): ranks 0, 1, ... in turn."""
        rank = self._next_round_robin
        self._next_round_robin = (rank + 1) % self.dp_size
        return rank

    # --- stage 1: which waiting requests a rank may consider ---------------------------------------------

    def _join_limits(self) -> list[int | None]:
        """Per rank, the highest ``ready_step`` a waiting request may have to join this step; None = any.

        Without join lag every request may join. With it, a request that arrived during the running step waits
        one more, unless its rank has nothing else to run (vLLM) or the whole instance has nothing else (SGLang).
        """
        if not self.config.join_lag_steps:
            return [None] * self.dp_size
        index = self._steps
        own = [bool(r.running) or any(q.ready_step <= index for q in r.waiting.values()) for r in self._ranks]
        if self.config.idle_rank_joins_next_step:
            return [index if busy else None for busy in own]
        limit = index if any(own) else None
        return [limit] * self.dp_size

    def _prefill_gates(self, limits: list[int | None]) -> list[PrefillGate]:
        """Per rank, what prefill the engines' own alignment lets it run this step: SGLang's PrefillDelayer (every
        rank holds new prefill together) and vLLM's ``prefill_schedule_interval`` (a rank with decodes runs no
        prefill off the cadence). Both off: every rank open."""
        cfg = self.config
        gates: list[PrefillGate] = ["open"] * self.dp_size
        if cfg.enable_prefill_delayer and self._prefill_delayer_holds(limits):
            gates = ["admitted"] * self.dp_size
        if cfg.prefill_schedule_interval > 1 and self._off_cadence():
            gates = [
                "closed" if r.running and not r.prefill_capacity_bound else g
                for r, g in zip(self._ranks, gates, strict=True)
            ]
        return gates

    def _off_cadence(self) -> bool:
        """vLLM: whether this step is off the prefill cadence. Under DP the ranks share a step counter that restarts
        when the instance goes idle (``step_counter % N != 0``); one rank counts from its last prefill-carrying step."""
        interval = self.config.prefill_schedule_interval
        if self.dp_size > 1:
            return self._busy_steps % interval != 0
        return (self._steps + 1) - self._last_prefill_step < interval

    def _prefill_delayer_holds(self, limits: list[int | None]) -> bool:
        """SGLang PrefillDelayer's negotiation for this pass (``_negotiate_should_allow_prefill_pure``): True holds new
        prefill on every rank. Records each rank's attempted prefill batch for the ``max_prefill_bs`` tracker."""
        cfg = self.config
        watermark = cfg.prefill_delayer_token_usage_low_watermark
        prefillable: list[bool] = []
        force = False
        self._delayer_attempts = [0] * self.dp_size
        for i, (rank, limit) in enumerate(zip(self._ranks, limits, strict=True)):
            can = self._can_prefill(rank, limit)
            prefillable.append(can)
            if not can:
                continue
            force = force or (watermark is not None and rank.kv_used / cfg.kv_capacity_tokens < watermark)
            queued = sum(1 for q in rank.waiting.values() if limit is None or q.ready_step <= limit)
            self._delayer_attempts[i] = min(max(queued, 1), max(cfg.max_running_requests - len(rank.running), 1))
        if not any(prefillable) or force:
            self._delayed_passes = None
            return False
        if all(prefillable):
            running = max(len(r.running) for r in self._ranks)
            max_prefill_bs = max(max(r.recent_prefill_bs, default=0) for r in self._ranks)
            if cfg.max_running_requests - running >= max_prefill_bs:
                self._delayed_passes = None
                return False
            if self._skip_first_delay:
                self._skip_first_delay = False
                self._delayed_passes = None
                return False
        passes = self._delayed_passes or 0
        if passes < cfg.prefill_delayer_max_delay_passes - 1:
            self._delayed_passes = passes + 1
            return True
        self._delayed_passes = None  # wait_timeout
        return False

    def _can_prefill(self, rank: _Rank, limit: int | None) -> bool:
        """Whether ``rank`` would put a request in a prefill batch this pass: one part-way through its prompt, or the
        first waiting one if it passes admission (a running slot and the admission rule's KV check)."""
        cfg = self.config
        head: _Request | None = None
        for req in rank.waiting.values():
            if limit is not None and req.ready_step > limit:
                continue
            if req.admitted:
                return True
            head = req
            break
        if head is None or rank.admitted >= cfg.max_running_requests:
            return False
        remaining = head.prefill_target - head.prefilled
        if cfg.admission == "sglang":
            free = cfg.kv_capacity_tokens - rank.kv_used
            return remaining + self._sglang_max_new(head) < free - self._sglang_running_offset(rank)
        if cfg.admission == "reserve_output":
            return rank.kv_reserved + head.kv_reservation <= cfg.kv_capacity_tokens
        chunk = min(remaining, cfg.max_prefill_tokens_per_step)
        return self._blocks_needed(head, chunk) <= self._free_blocks(rank)

    def _after_prefill_gates(self, gates: list[PrefillGate], limits: list[int | None], steps: list[_RankStep]) -> None:
        """Update the alignment state from what the step ran: SGLang's recent prefill batch sizes (the actual batch,
        or the attempted one when held), vLLM's per-rank ``prefill_capacity_bound`` and one rank's last prefill step."""
        cfg = self.config
        if cfg.enable_prefill_delayer:
            for rank, attempt, step in zip(self._ranks, self._delayer_attempts, steps, strict=True):
                observed = step.prefill_reqs or attempt
                if observed > 0:
                    rank.recent_prefill_bs.append(observed)
        if cfg.prefill_schedule_interval > 1:
            for rank, gate, limit in zip(self._ranks, gates, limits, strict=True):
                if gate != "closed":
                    rank.prefill_capacity_bound = any(
                        not q.admitted and (limit is None or q.ready_step <= limit) for q in rank.waiting.values()
                    )
            if any(s.prefill_tokens for s in steps):
                self._last_prefill_step = self._steps + 1

    # --- stage 2: what each rank runs ------------------------------------------------------------------------

    def _step_idealised(self, rank: _Rank, limit: int | None, gate: PrefillGate) -> _RankStep:
        """Decode every running request and prefill FCFS up to the budget, decode tokens not counted."""
        cfg = self.config
        out = _RankStep()
        decoding = list(rank.running.values())
        if decoding:
            out.work_s += cfg.decode_s(len(decoding), sum(r.kv for r in decoding))
        completed: list[_Request] = []
        budget = 0 if gate == "closed" else cfg.max_prefill_tokens_per_step
        out.work_s += self._prefill(rank, budget, completed, out, limit, admitted_only=gate == "admitted")
        self._finish_step(rank, decoding, completed, out)
        return out

    def _step_sglang(self, rank: _Rank, limit: int | None, gate: PrefillGate) -> _RankStep:
        """SGLang: a prefill batch if one can be formed (the rank's decodes wait), else a decode batch; with
        ``enable_mixed_chunk`` the decodes ride along and their tokens come out of the chunk budget."""
        cfg = self.config
        out = _RankStep()
        mixed = cfg.enable_mixed_chunk and bool(rank.running)
        budget = cfg.max_prefill_tokens_per_step - (len(rank.running) if mixed else 0)
        if gate == "closed":
            budget = 0
        completed: list[_Request] = []
        prefill_s = (
            self._prefill(rank, budget, completed, out, limit, admitted_only=gate == "admitted") if budget > 0 else 0.0
        )
        decoding: list[_Request] = []
        if out.prefill_tokens == 0 or mixed:
            decoding = self._sglang_decode_batch(rank)
            if decoding:
                out.work_s += cfg.decode_s(len(decoding), sum(r.kv for r in decoding))
        out.work_s += prefill_s
        self._finish_step(rank, decoding, completed, out)
        return out

    def _step_vllm(self, rank: _Rank, limit: int | None, gate: PrefillGate) -> _RankStep:
        """vLLM: running requests first (decodes, then unfinished chunked prefills), each allocating the KV blocks
        of its tokens and preempting the newest running request when none are free; then, if nothing was
        preempted, new requests FCFS; one token budget for all."""
        cfg = self.config
        out = _RankStep()
        budget = cfg.max_prefill_tokens_per_step
        candidates = list(rank.running.values())
        if gate != "closed":
            candidates += [q for q in rank.waiting.values() if q.admitted]
        preempted: set[str] = set()
        decoding: list[_Request] = []
        chunks: list[tuple[_Request, int]] = []
        for i, req in enumerate(candidates):
            if budget == 0:
                break
            if req.request_id in preempted:
                continue
            is_decode = req.request_id in rank.running
            n = 1 if is_decode else min(req.prefill_target - req.prefilled, budget)
            if cfg.admission == "vllm":
                while self._blocks_needed(req, n) > self._free_blocks(rank):
                    victim = next(v for v in reversed(candidates[i:]) if v.request_id not in preempted)
                    self._preempt(rank, victim, front=True)
                    preempted.add(victim.request_id)
                    if victim is req:
                        break
                if req.request_id in preempted:
                    break
            if is_decode:
                decoding.append(req)
            else:
                chunks.append((req, n))
            budget -= n
        if decoding:
            out.work_s += cfg.decode_s(len(decoding), sum(r.kv for r in decoding))
        completed: list[_Request] = []
        for req, n in chunks:
            out.work_s += self._run_chunk(rank, req, n, out)
            if req.prefilled == req.prefill_target:
                completed.append(req)
        if not preempted and budget > 0 and gate == "open":
            out.work_s += self._prefill(rank, budget, completed, out, limit, new_only=True)
        self._finish_step(rank, decoding, completed, out)
        return out

    def _step_fairbatching(self, rank: _Rank, limit: int | None, gate: PrefillGate, budget_s: float) -> _RankStep:
        """FairBatching (our reading, see ``EngineModelConfig.batching``): the decodes that cannot wait run, prefill
        fills the step's time budget FCFS, and the decodes with slack run in what time is left."""
        cfg = self.config
        out = _RankStep()
        now = self._clock_s
        by_slack = sorted(rank.running.values(), key=lambda r: self._due_s(r) - now)
        urgent = [r for r in by_slack if self._due_s(r) - now < budget_s + cfg.tpot_slo_s]
        spare = by_slack[len(urgent) :]
        left = budget_s - cfg.alltoall_s - cfg.decode_s(len(urgent), sum(r.kv for r in urgent))
        completed: list[_Request] = []
        prefill_s = 0.0
        if gate != "closed" and left > 0:
            tokens = self._tokens_in_time(rank, limit, gate == "admitted", left)
            if tokens:
                prefill_s = self._prefill(rank, tokens, completed, out, limit, admitted_only=gate == "admitted")
        left -= prefill_s
        decoding = list(urgent)
        for req in spare:
            cost = cfg.decode_s(1, req.kv)
            if cost > left:
                break
            decoding.append(req)
            left -= cost
        if decoding:
            out.work_s += cfg.decode_s(len(decoding), sum(r.kv for r in decoding))
        out.work_s += prefill_s
        self._finish_step(rank, decoding, completed, out)
        return out

    def _due_s(self, req: _Request) -> float:
        """FairBatching's deadline of ``req``'s next token: ``arrival + ttft_slo + j x tpot_slo``, engine seconds."""
        return req.arrival_s + self.config.ttft_slo_s + req.generated * self.config.tpot_slo_s

    def _fairbatching_budget_s(self) -> float:
        """The step's time budget: the least slack over the instance's running (decoding) requests, at most half the
        TTFT objective (so a request arriving during a step can still have its prefill in the next within its
        objective) and at least one TPOT objective, seconds; half the TTFT objective when nothing decodes."""
        cfg = self.config
        now = self._clock_s
        least = min((self._due_s(r) - now for rank in self._ranks for r in rank.running.values()), default=math.inf)
        return max(min(least, cfg.ttft_slo_s / 2), cfg.tpot_slo_s)

    def _tokens_in_time(self, rank: _Rank, limit: int | None, admitted_only: bool, seconds: float) -> int:
        """Prompt tokens FCFS prefill can take in ``seconds`` of work (the chunk cost of
        :meth:`EngineModelConfig.prefill_chunk_s` solved for the chunk), the order :meth:`_prefill` takes them in."""
        cfg = self.config
        tokens = 0
        for req in rank.waiting.values():
            if (limit is not None and req.ready_step > limit) or (admitted_only and not req.admitted):
                continue
            remaining = req.prefill_target - req.prefilled
            a = cfg.prefill_attn_s / 2
            b = cfg.prefill_token_s + cfg.prefill_attn_s * req.prefilled
            fits = seconds / b if a == 0 else (-b + math.sqrt(b * b + 4 * a * seconds)) / (2 * a)
            chunk = min(remaining, math.floor(fits))
            if chunk <= 0:
                break
            tokens += chunk
            seconds -= cfg.prefill_chunk_s(chunk, req.prefilled)
            if chunk < remaining:
                break
        return tokens

    def _prefill(
        self,
        rank: _Rank,
        budget: int,
        completed: list[_Request],
        out: _RankStep,
        limit: int | None,
        new_only: bool = False,
        admitted_only: bool = False,
    ) -> float:
        """Prefill FCFS up to ``budget`` tokens, admitting requests by the configured rule (none with
        ``admitted_only``); appends requests whose prefill completes. Returns seconds."""
        cfg = self.config
        admission = cfg.admission
        offset = self._sglang_running_offset(rank) if admission == "sglang" else 0.0
        free = cfg.kv_capacity_tokens - rank.kv_used  # SGLang's budget is taken once per pass
        work = 0.0
        tried: _Request | None = None  # the last request that looked up the prefix cache
        for req in list(rank.waiting.values()):
            if budget == 0:
                break
            if limit is not None and req.ready_step > limit:
                continue
            if req.admitted and new_only:
                continue
            if admitted_only and not req.admitted:
                continue
            if rank.cache is not None and not req.admitted:
                self._cache_hit(rank, req)
                tried = req
            remaining = req.prefill_target - req.prefilled
            chunk = min(remaining, budget)
            if admission == "sglang":
                need = remaining + self._sglang_max_new(req)
                if not req.admitted and need >= free - offset:
                    break  # SGLang: NO_TOKEN
                offset += need
                chunk = min(chunk, cfg.kv_capacity_tokens - rank.kv_used)
                if chunk <= 0:
                    break
            if not req.admitted:
                if rank.admitted >= cfg.max_running_requests:
                    break  # head-of-line blocking
                if admission == "reserve_output":
                    if rank.kv_reserved + req.kv_reservation > cfg.kv_capacity_tokens:
                        break
                    rank.kv_reserved += req.kv_reservation
                elif admission == "vllm" and self._blocks_needed(req, chunk) > self._free_blocks(rank):
                    break
                req.admitted = True
                rank.admitted += 1
                self._admissions += 1
                req.admit_seq = self._admissions
            work += self._run_chunk(rank, req, chunk, out)
            budget -= chunk
            if req.prefilled == req.prefill_target:
                completed.append(req)
        if tried is not None and not tried.admitted:
            self._cache_unhit(rank, tried)  # admission refused it: it holds nothing while it waits
        return work

    def _run_chunk(self, rank: _Rank, req: _Request, chunk: int, out: _RankStep) -> float:
        """Prefill ``chunk`` tokens of ``req``: KV grows, the step's counters too. Returns seconds."""
        cfg = self.config
        seconds = cfg.prefill_chunk_s(chunk, req.prefilled)
        if cfg.kv_block_size > 1:
            rank.kv_blocks += _ceil_div(req.kv + chunk, cfg.kv_block_size) - _ceil_div(req.kv, cfg.kv_block_size)
        else:
            rank.kv_blocks += chunk
        req.prefilled += chunk
        req.kv += chunk
        rank.kv_used += chunk
        out.prefill_tokens += chunk
        if rank.cache is not None:
            self._cache_computed(rank, req, chunk)
        out.prefill_reqs += 1
        return seconds

    def _finish_step(self, rank: _Rank, decoding: list[_Request], completed: list[_Request], out: _RankStep) -> None:
        """Emit the decoded requests' tokens, then move completed prefills to running and emit theirs."""
        cfg = self.config
        out.decoded = len(decoding)
        if cfg.routed_expert_fraction:
            out.linear_s = cfg.prefill_token_s * out.prefill_tokens + cfg.decode_req_s * len(decoding)
        for req in decoding:
            out.tokens.append(self._emit(rank, req))
        for req in completed:
            del rank.waiting[req.request_id]
            rank.running[req.request_id] = req
            out.tokens.append(self._emit(rank, req))

    # --- admission rules -------------------------------------------------------------------------------------

    def _sglang_max_new(self, req: _Request) -> int:
        """The tokens SGLang expects ``req`` may still generate: ``max_new_tokens`` less its output, clipped."""
        return min(max(req.max_new_tokens - req.generated, 0), self.config.new_token_ratio.clip_max_new_tokens)

    def _sglang_running_offset(self, rank: _Rank) -> float:
        """KV tokens SGLang holds back for the running requests' future output (``PrefillAdder``): each one's
        remaining clipped ``max_new_tokens`` times the new-token ratio (1 for ``ignore_eos`` requests)."""
        ratio = rank.new_token_ratio
        return sum(self._sglang_max_new(r) * (1.0 if r.ignore_eos else ratio) for r in rank.running.values())

    def _sglang_decode_batch(self, rank: _Rank) -> list[_Request]:
        """The running requests a SGLang decode step runs. With SGLang admission: if the KV cannot take one more
        token each, retract requests (fewest output tokens first, then longest prompt; at least one, never the
        last) and re-estimate the new-token ratio from the kept ones; else the ratio decays one step."""
        cfg = self.config
        decoding = list(rank.running.values())
        if not decoding or cfg.admission != "sglang":
            return decoding
        ratio = cfg.new_token_ratio
        if cfg.kv_capacity_tokens - rank.kv_used >= len(decoding):
            rank.new_token_ratio = max(rank.new_token_ratio - ratio.decay, ratio.floor)
            return decoding
        keep = sorted(decoding, key=lambda r: (r.generated, -r.prompt_tokens), reverse=True)
        while len(keep) > 1:
            self._preempt(rank, keep.pop(), front=False)
            if cfg.kv_capacity_tokens - rank.kv_used >= len(keep):
                break
        decoded = sum(r.generated for r in keep)
        max_new = sum(r.max_new_tokens for r in keep)
        rank.new_token_ratio = min(1.0, (decoded + ratio.retract_decode_steps * len(keep)) / (max_new + 1))
        return [r for r in decoding if r.request_id in rank.running]

    def _blocks_needed(self, req: _Request, tokens: int) -> int:
        size = self.config.kv_block_size
        return _ceil_div(req.kv + tokens, size) - _ceil_div(req.kv, size)

    def _free_blocks(self, rank: _Rank) -> int:
        return self.config.kv_capacity_tokens // self.config.kv_block_size - rank.kv_blocks

    def _preempt(self, rank: _Rank, req: _Request, front: bool) -> None:
        """Free ``req``'s KV and queue it to prefill its prompt and output so far again (vLLM at the front of the
        queue, SGLang's retraction at the back)."""
        rank.running.pop(req.request_id, None)
        rank.waiting.pop(req.request_id, None)
        self._free_kv(rank, req)
        req.kv = 0
        req.prefilled = 0
        req.prefill_target = req.prompt_tokens + req.generated
        req.ready_step = 0
        rank.preemptions += 1
        if front:
            rank.waiting = {req.request_id: req, **rank.waiting}
        else:
            rank.waiting[req.request_id] = req

    # --- the prefix cache (with ``enable_prefix_caching``) ----------------------------------------------------

    def _cache_hit(self, rank: _Rank, req: _Request) -> None:
        """Look ``req`` up in its rank's cache before admission: the longest run of its leading prompt blocks held
        there (and computed by an earlier step) becomes prefilled, and the request references those blocks, so
        they cannot be evicted while it runs and cost no prefill. Both engines compute at least the prompt's last
        token (vLLM ``Request.get_max_cache_hit_length``: ``num_tokens - 1``; SGLang likewise keeps one token to
        extend), so a hit stops before a block that would cover the whole prompt. Counts the lookup in vLLM's
        ``vllm:prefix_cache_queries``/``_hits`` unless the request was preempted before (vLLM counts those apart,
        ``PrefixCacheStats.record``)."""
        cache = rank.cache
        assert cache is not None
        self._cache_roll(cache)
        fresh = req.generated == 0
        if fresh:
            cache.queries += req.prompt_tokens
        if req.prefilled or not req.prefix_blocks:
            return
        limit = req.prompt_tokens - 1
        hit = 0
        refs: list[_CachedBlock] = []
        for key in req.prefix_blocks:
            block = cache.blocks.get(key)
            if block is None or block.ready_step > self._steps or hit + block.tokens > limit:
                break
            hit += block.tokens
            refs.append(block)
        if not refs:
            return
        for block in refs:
            if block.refs == 0:
                del cache.idle[block.key]
                cache.idle_tokens -= block.tokens
                cache.idle_blocks -= block.blocks
                rank.kv_used += block.tokens
                rank.kv_blocks += block.blocks
            block.refs += 1
        req.cache_refs = refs
        req.cache_next = len(refs)
        req.prefilled = req.kv = hit
        cache.batch_hits += hit
        if fresh:
            cache.hits += hit

    def _cache_unhit(self, rank: _Rank, req: _Request) -> None:
        """Undo :meth:`_cache_hit` for a request admission refused: it holds no blocks while it waits (its blocks go
        back to the idle list as just used, as SGLang's prefix match refreshes them)."""
        cache = rank.cache
        assert cache is not None
        if req.generated == 0:
            cache.queries -= req.prompt_tokens
            cache.hits -= req.prefilled
        cache.batch_hits -= req.prefilled
        self._free_kv(rank, req)
        req.kv = req.prefilled = 0

    def _cache_computed(self, rank: _Rank, req: _Request, chunk: int) -> None:
        """``req`` just prefilled ``chunk`` tokens: each prompt block now wholly computed enters the cache, held by
        ``req``, hittable from the next step on. Only whole KV blocks are cached (vLLM caches full blocks,
        ``kv_block_size`` tokens; SGLang's page is 1 token), so a partial last prompt block is cached rounded
        down. A block already cached (computed meanwhile by another request) stays the request's own copy."""
        cache = rank.cache
        assert cache is not None
        self._cache_roll(cache)
        cache.batch_input += chunk
        size, page = req.prefix_block_tokens, self.config.kv_block_size
        while req.cache_next < len(req.prefix_blocks):
            i = req.cache_next
            end = min((i + 1) * size, req.prompt_tokens)
            if end > req.prefilled:
                break
            req.cache_next += 1
            key = req.prefix_blocks[i]
            tokens = (end - i * size) // page * page
            if tokens <= 0 or key in cache.blocks:
                continue  # no whole KV block (or a block id past the prompt's end), or cached already
            block = _CachedBlock(key, tokens, tokens // page, self._steps + 1, refs=1)
            cache.blocks[key] = block
            cache.tokens += tokens
            req.cache_refs.append(block)
        self._cache_fit(rank)

    def _cache_release(self, rank: _Rank, req: _Request) -> None:
        """``req`` leaves the rank or is preempted (its KV, counted whole, was just freed): the blocks it held and no
        other request holds become idle, last block first, so that the least recently used block, and within a
        prompt its tail, is evicted first (vLLM ``BlockPool.free_blocks`` frees a request's blocks in reverse
        order; SGLang's radix cache evicts least recently used leaves first)."""
        cache = rank.cache
        assert cache is not None
        for block in reversed(req.cache_refs):
            rank.kv_used += block.tokens
            rank.kv_blocks += block.blocks
            block.refs -= 1
            if block.refs == 0:
                rank.kv_used -= block.tokens
                rank.kv_blocks -= block.blocks
                cache.idle[block.key] = block
                cache.idle_tokens += block.tokens
                cache.idle_blocks += block.blocks
        req.cache_refs = []
        req.cache_next = 0

    def _cache_fit(self, rank: _Rank) -> None:
        """Evict idle blocks, least recently used first, while the KV the requests use plus the idle cache exceeds
        the rank's capacity (both engines count idle cached blocks as free and evict them on allocation)."""
        cache = rank.cache
        assert cache is not None
        cfg = self.config
        capacity_blocks = cfg.kv_capacity_tokens // cfg.kv_block_size
        while cache.idle and (
            rank.kv_used + cache.idle_tokens > cfg.kv_capacity_tokens
            or rank.kv_blocks + cache.idle_blocks > capacity_blocks
        ):
            key, block = cache.idle.popitem(last=False)
            del cache.blocks[key]
            cache.idle_tokens -= block.tokens
            cache.idle_blocks -= block.blocks
            cache.tokens -= block.tokens

    def _cache_roll(self, cache: _PrefixCache) -> None:
        """Close the step whose hits and prefilled tokens ``cache`` sums once a later step runs: SGLang sets
        ``sglang:cache_hit_rate`` after each prefill batch to its cached tokens over cached plus new tokens
        (sglang/srt/managers/scheduler_components/metrics_reporter.py ``report_prefill_stats``)."""
        if cache.batch_step == self._steps:
            return
        if cache.batch_input > 0:
            cache.hit_rate = cache.batch_hits / (cache.batch_hits + cache.batch_input)
        cache.batch_step, cache.batch_hits, cache.batch_input = self._steps, 0, 0

    def _cache_stats(self, rank: _Rank) -> dict[str, Any]:
        """The prefix-cache fields of :class:`RankStats` (all 0 without a cache)."""
        cache = rank.cache
        if cache is None:
            return {}
        self._cache_roll(cache)
        return {
            "prefix_cache_queries": cache.queries,
            "prefix_cache_hits": cache.hits,
            "cache_hit_rate": cache.hit_rate,
            "prefix_cache_tokens": cache.tokens,
        }

    # --- stage 3: the lockstep step's cost -------------------------------------------------------------------

    def _duration(self, steps: list[_RankStep]) -> tuple[float, list[float]]:
        """Step time and each rank's work: all-to-all + max over ranks of own work + mean of the EP-shared part
        (``routed_expert_fraction`` of each rank's linear cost)."""
        work = [s.work_s for s in steps]
        share = self.config.routed_expert_fraction
        if not share:
            return self.config.alltoall_s + max(work), work
        shared = [share * s.linear_s for s in steps]
        mean_shared = sum(shared) / len(shared)
        work = [w - sh + mean_shared for w, sh in zip(work, shared, strict=True)]
        return self.config.alltoall_s + max(work), work

    # --- bookkeeping -----------------------------------------------------------------------------------------

    def _emit(self, rank: _Rank, req: _Request) -> TokenEvent:
        event = TokenEvent(req.request_id, req.rank, req.generated, req.generated + 1 == req.output_tokens)
        if req.kv % self.config.kv_block_size == 0:
            rank.kv_blocks += 1
        req.generated += 1
        req.kv += 1
        rank.kv_used += 1
        if rank.cache is not None:
            self._cache_fit(rank)
        if event.finished:
            del rank.running[req.request_id]
            self._release(rank, req)
        return event

    def _free_kv(self, rank: _Rank, req: _Request) -> None:
        rank.kv_used -= req.kv
        rank.kv_blocks -= _ceil_div(req.kv, self.config.kv_block_size)
        if rank.cache is not None:
            self._cache_release(rank, req)
        if req.admitted:
            req.admitted = False
            rank.admitted -= 1
            if self.config.admission == "reserve_output":
                rank.kv_reserved -= req.kv_reservation

    def _release(self, rank: _Rank, req: _Request) -> None:
        del self._requests[req.request_id]
        self._free_kv(rank, req)
