"""A discrete-step model of one DP+EP engine instance: ``dp_size`` DP ranks running steps in lockstep.

Pure and synchronous: no I/O, no asyncio, no clock. :meth:`EngineModel.step` plans and commits one forward
step of the whole instance and returns how long it took (engine seconds) and which output tokens it
produced; whoever drives the model (the HTTP mock engine in real time, a simulator in virtual time) owns
the clock. Deterministic: the same calls give the same results.

Per DP rank (docs/design.md §1 and §5; constants, formulas and every option's source in
:mod:`gateway.sim.calibration`; each rule's module in :mod:`gateway.sim.engine`):

- a FCFS *waiting* queue of requests not yet fully prefilled and a *running* set of decoding requests
  (:mod:`~gateway.sim.engine.rank`);
- a step's content follows ``step_composition``: idealised (every running request decodes one token and waiting
  requests prefill FCFS up to the budget, chunking a long prompt over several steps), SGLang (prefill *or* decode,
  or both with ``enable_mixed_chunk``) or vLLM (running requests first, then new ones, under one token budget)
  (:mod:`~gateway.sim.engine.composition`); or ``batching="fairbatching"``, a step bounded by time
  (:mod:`~gateway.sim.engine.fairbatching`);
- a waiting request is *admitted* (may start prefill) under ``max_running_requests`` and the ``admission`` rule:
  idealised, its prompt plus its true output fit the unreserved KV (so nothing is ever preempted); SGLang's
  new-token ratio with retraction; vLLM's block allocation with preemption. A request admission refuses blocks
  everything behind it (head-of-line blocking) (:mod:`~gateway.sim.engine.admission`);
- a preempted or retracted request loses its KV and prefills its prompt plus its output so far again;
- with ``enable_prefix_caching``, a request skips the prefill of the leading prompt blocks its rank's prefix cache
  holds (:mod:`~gateway.sim.engine.prefix_cache`);
- the step that completes a request's prefill emits its next output token (the first, unless it was preempted);
  each later step that decodes it emits one; a request that has produced its ``output_tokens`` finishes and
  frees its KV;
- with ``join_lag_steps`` a request reaching a rank while a step runs joins the step after next;
- the engines' own prefill alignment, off by default, gates what prefill a rank may run in a step: SGLang's
  PrefillDelayer (all ranks hold new prefill together for a bounded number of passes until every rank can prefill)
  and vLLM's ``prefill_schedule_interval`` (a rank with decodes prefills only on every Nth step, the same steps on
  every rank) (:mod:`~gateway.sim.engine.prefill_alignment`);
- under P/D disaggregation (``role``, off by default), a prefill rank keeps a finished request's KV until the decode
  side has fetched it, and a decode rank reserves KV for a request, fetches its prompt's KV, then decodes it with no
  prefill compute; time for the transfers and leases is passed in (:meth:`EngineModel.advance`)
  (:mod:`~gateway.sim.engine.pd`).

Instance step time = ``alltoall_s + max over ranks(own work) + mean over ranks(EP-shared work)``: a rank with
nothing to do runs a dummy step and waits for the slowest. With no work on any rank there is no step.

A step runs in stages: which waiting requests each rank may consider (:meth:`EngineModel._join_limits`) and what
prefill it may run (:meth:`PrefillAlignment.gates <gateway.sim.engine.prefill_alignment.PrefillAlignment.gates>`);
what each rank runs (:class:`~gateway.sim.engine.composition.Composition` or
:class:`~gateway.sim.engine.fairbatching.FairBatching`), whose tokens the model then emits
(:meth:`EngineModel._finish`); and the cost of the lockstep step (:meth:`EngineModel._duration`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.sim.calibration import EngineModelConfig
from gateway.sim.engine.admission import admission_for
from gateway.sim.engine.composition import Composition
from gateway.sim.engine.fairbatching import FairBatching
from gateway.sim.engine.pd import DecodeHandoff, next_event_s
from gateway.sim.engine.prefill_alignment import PrefillAlignment
from gateway.sim.engine.prefix_cache import PrefixCache
from gateway.sim.engine.rank import Rank, RankStep, Request
from gateway.sim.engine_defaults import SGLANG_HELD_PASS_S
from gateway.types import PREFIX_BLOCK_TOKENS


@dataclass(slots=True)
class TokenEvent:
    """One output token produced by a step. Not frozen: a step makes one per running request, and a frozen dataclass
    costs four times as much to build; nothing changes one.

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
        prealloc: P/D decode: requests in the pre-allocation queue (no KV reserved yet).
        prealloc_tokens: P/D decode: prompt tokens of those requests (the KV they will reserve), tokens.
        transfer: P/D decode: requests with KV reserved, fetching it from the prefill side.
        transfer_kv_tokens: P/D decode: KV tokens reserved for those transfers (in ``kv_used_tokens``), tokens.
        held: P/D prefill: finished requests whose KV the rank keeps for the decode side (in ``kv_used_tokens``).
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
    prealloc: int = 0
    transfer: int = 0
    transfer_kv_tokens: int = 0
    prealloc_tokens: int = 0
    held: int = 0


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
        self._ranks = [
            Rank(
                config.new_token_ratio.start,
                config.kv_block_size,
                PrefixCache(config.kv_capacity_tokens, config.kv_block_size) if config.enable_prefix_caching else None,
            )
            for _ in range(dp_size)
        ]
        self._admission = admission_for(config)
        self._alignment = PrefillAlignment(config, self._ranks, self._admission)
        self._composition = Composition(config, self._admission)
        self._fairbatching = FairBatching(config, self._composition)
        self._handoff = DecodeHandoff(config, self._admission)
        self._held_now: list[Request] = []  # prefill requests whose KV the running step started holding
        self._requests: dict[str, Request] = {}
        self._next_round_robin = 0
        self._steps = 0  # steps run so far; the index of the next one
        self._in_step = False  # the last step() call handed out a step the driver is still running
        self._clock_s = 0.0  # engine time at the start of the next step: the sum of step durations
        self._active: set[int] = set()  # ranks that may have a waiting or running request (a superset)
        self._idle_step = RankStep()  # what a rank with nothing waiting or running runs (no side effect, read only)
        self._stepped: set[int] = set()  # ranks that ran a step since the instance was last idle

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
        hold_kv: bool = False,
        remote_prefill: bool = False,
    ) -> None:
        """Queue a request on a DP rank; it joins at the next step (the one after with ``join_lag_steps`` while a
        step runs), or, with ``remote_prefill``, the rank's pre-allocation queue (:meth:`advance`).

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
                ``config.enable_prefix_caching`` (see
                :meth:`PrefixCache.hit <gateway.sim.engine.prefix_cache.PrefixCache.hit>`); empty means nothing can be
                shared.
            prefix_block_tokens: tokens per prefix block (Mooncake: 512), a multiple of ``config.kv_block_size``.
            hold_kv: P/D prefill (``config.role="prefill"``): when it finishes, its KV stays held for the decode side
                (:meth:`release_held`).
            remote_prefill: P/D decode (``config.role="decode"``): its prompt's KV comes from a prefill rank
                (:meth:`kv_ready`); it runs no prefill (its prefix blocks are ignored).

        Raises:
            ValueError: bad rank, duplicate id, non-positive lengths, a request whose prompt plus
                output exceeds one rank's KV capacity (it could never be admitted), or ``hold_kv`` /
                ``remote_prefill`` on an instance of another role.
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
        if (hold_kv and cfg.role != "prefill") or (remote_prefill and cfg.role != "decode"):
            raise ValueError(f"hold_kv needs role='prefill' and remote_prefill role='decode', got role={cfg.role!r}")
        if max_new_tokens is None:
            max_new_tokens = max(1, cfg.context_length - prompt_tokens)
        ready = self._steps + (cfg.join_lag_steps if self._in_step else 0)
        req = Request(request_id, rank, prompt_tokens, output_tokens, max_new_tokens, ignore_eos, ready, prompt_tokens)
        if self.config.enable_prefix_caching and prefix_blocks:
            if prefix_block_tokens < 1 or prefix_block_tokens % cfg.kv_block_size:
                raise ValueError(
                    f"prefix_block_tokens must be a positive multiple of kv_block_size ({cfg.kv_block_size}), "
                    f"got {prefix_block_tokens}"
                )
            req.prefix_blocks = tuple(prefix_blocks)
            req.prefix_block_tokens = prefix_block_tokens
        req.arrival_s = self._clock_s
        req.hold_kv = hold_kv
        self._requests[request_id] = req
        if remote_prefill:
            req.remote_prefill = True
            req.prefix_blocks = ()
            self._ranks[rank].prealloc[request_id] = req
            return
        self._ranks[rank].waiting[request_id] = req
        self._active.add(rank)

    def abort(self, request_id: str) -> bool:
        """Remove a request wherever it is and free its KV. Returns True if it was in the model."""
        req = self._requests.get(request_id)
        if req is None:
            return False
        rank = self._ranks[req.rank]
        if rank.held.pop(request_id, None) is not None:
            self._drop_held(rank, req)
            return True
        for queue in (rank.waiting, rank.running, rank.prealloc, rank.transfer):
            queue.pop(request_id, None)
        self._release(rank, req)
        return True

    # --- P/D disaggregation (rules in gateway.sim.engine.pd) ---------------------------------------------------

    def kv_ready(self, request_id: str, now_s: float) -> bool:
        """The prefill side has the KV of ``remote_prefill`` request ``request_id`` at ``now_s`` (engine seconds):
        its transfer starts as soon as it has its reservation. Returns False if no such request is waiting for KV."""
        req = self._requests.get(request_id)
        if req is None or not req.remote_prefill or req.kv_ready:
            return False
        req.kv_ready = True
        if request_id in self._ranks[req.rank].transfer:
            self._handoff.start(req, now_s)
        return True

    def recompute(self, request_id: str) -> bool:
        """A ``remote_prefill`` request whose KV cannot be fetched prefills its prompt on its decode rank instead
        (vLLM's ``kv_load_failure_policy="recompute"``): its reservation is freed and it queues as a local request.
        Returns False if it is not waiting for KV."""
        req = self._requests.get(request_id)
        if req is None or not req.remote_prefill:
            return False
        rank = self._ranks[req.rank]
        if rank.prealloc.pop(request_id, None) is None and rank.transfer.pop(request_id, None) is None:
            return False
        rank.free_kv(req)
        req.kv = 0
        req.remote_prefill = False
        req.transfer_end_s = None
        req.ready_step = self._steps
        rank.waiting[request_id] = req
        self._active.add(req.rank)
        return True

    def release_held(self, request_id: str) -> bool:
        """The decode side has fetched the KV prefill request ``request_id`` held: free it. Returns False if it
        holds none."""
        req = self._requests.get(request_id)
        if req is None or self._ranks[req.rank].held.pop(request_id, None) is None:
            return False
        self._drop_held(self._ranks[req.rank], req)
        return True

    def advance(self, now_s: float) -> list[TokenEvent]:
        """Bring the P/D queues to ``now_s`` (engine seconds): free held KV whose lease expired, reserve KV for the
        pre-allocation queues' heads, and start decoding the requests whose transfer has completed. With
        ``pd_connector="sglang"`` each of those emits its first output token (the prefill's, carried with the KV).
        Nothing to do on a mixed instance."""
        tokens: list[TokenEvent] = []
        if self.config.role == "mixed":
            return tokens
        for rank in self._ranks:
            for req in [r for r in rank.held.values() if r.held_until_s is not None and r.held_until_s <= now_s]:
                del rank.held[req.request_id]
                self._drop_held(rank, req)
            self._handoff.admit(rank, now_s)
            for req in self._handoff.arrived(rank, now_s):
                self._active.add(req.rank)
                if self.config.pd_connector == "sglang":
                    tokens.append(self._emit(rank, req))
        return tokens

    def holds(self, request_id: str) -> bool:
        """Whether prefill request ``request_id`` has finished and still holds its KV."""
        req = self._requests.get(request_id)
        return req is not None and request_id in self._ranks[req.rank].held

    def pd_phase(self, request_id: str) -> str | None:
        """Where a request is: ``"prealloc"``, ``"transfer"``, ``"held"``, ``"waiting"`` or ``"running"``; None if it
        has left the model."""
        req = self._requests.get(request_id)
        if req is None:
            return None
        rank = self._ranks[req.rank]
        for name, queue in (
            ("prealloc", rank.prealloc),
            ("transfer", rank.transfer),
            ("held", rank.held),
            ("waiting", rank.waiting),
        ):
            if request_id in queue:
                return name
        return "running"

    def next_event_s(self) -> float | None:
        """When :meth:`advance` next has something to do by the clock alone (a transfer ends, a lease expires), engine
        seconds; None if nothing is timed."""
        return next_event_s(self._ranks)

    def _drop_held(self, rank: Rank, req: Request) -> None:
        del self._requests[req.request_id]
        rank.free_kv(req)
        self._admission.drop_held(rank, req)

    @property
    def steps_run(self) -> int:
        """Lockstep steps run so far."""
        return self._steps

    def has_work(self) -> bool:
        """True if any rank has a waiting or running request (so :meth:`step` would run a step)."""
        ranks = self._ranks
        return any(ranks[i].waiting or ranks[i].running for i in self._active)

    def _active_ranks(self) -> list[int]:
        """The ranks with a waiting or running request, in rank order (the others run an empty step with no side
        effect: :attr:`_idle_step`)."""
        ranks = self._ranks
        active = sorted(i for i in self._active if ranks[i].waiting or ranks[i].running)
        if len(active) != len(self._active):
            self._active = set(active)
        return active

    def step(self, now_s: float | None = None) -> StepResult:
        """Plan and commit one lockstep step of all ranks; returns its duration and output tokens.

        With no work anywhere, returns a zero-duration result with no tokens (no step happened). ``now_s``, the
        driver's engine time at the start of the step (the model's own clock when None), dates the held KV of P/D
        prefill requests finishing in the step, whose lease (``config.kv_lease_s``) runs from the step's end.
        """
        n = self.dp_size
        active = self._active_ranks()
        if not active:
            self._in_step = False
            self._alignment.idle()
            start = self.config.new_token_ratio.start
            for i in self._stepped:  # only a rank that ran a step can have moved its ratio from the start
                self._ranks[i].new_token_ratio = start  # SGLang resets it when idle
            self._stepped.clear()
            return StepResult(0.0, [], [0] * n, [0] * n, [0.0] * n)
        self._stepped.update(active)
        limits = self._join_limits(active)
        index = self._steps
        gates = self._alignment.gates(limits, index)
        composition = self.config.step_composition
        batching = self.config.batching
        ranks = self._ranks
        budget_s = 0.0
        if batching == "fairbatching":
            budget_s = self._fairbatching.budget_s([ranks[i] for i in active], self._clock_s)
        steps = [self._idle_step] * n
        tokens: list[TokenEvent] = []
        for i in active:
            rank, limit, gate = ranks[i], limits[i], gates[i]
            if batching == "fairbatching":
                out = self._fairbatching.step(rank, limit, gate, budget_s, self._clock_s, index)
            elif batching == "stall_free":
                out = self._composition.vllm(rank, limit, gate, index)
            elif composition == "idealised":
                out = self._composition.idealised(rank, limit, gate, index)
            elif composition == "sglang":
                out = self._composition.sglang(rank, limit, gate, index)
            else:
                out = self._composition.vllm(rank, limit, gate, index)
            tokens += self._finish(rank, out)
            steps[i] = out
        self._alignment.after_step(gates, limits, steps, index)
        self._steps += 1
        self._in_step = True
        duration, work = self._duration(steps, active)
        if "open" not in gates and not any(steps[i].prefill_tokens or steps[i].decoding for i in active):
            duration, work = SGLANG_HELD_PASS_S, [0.0] * n  # a held pass with no forward (SGLANG_HELD_PASS_S)
        lease = self.config.kv_lease_s
        for req in self._held_now:
            if lease is not None:
                req.held_until_s = (self._clock_s if now_s is None else now_s) + duration + lease
        self._held_now.clear()
        self._clock_s += duration
        prefill_tokens = [0] * n
        decode_reqs = [0] * n
        for i in active:
            prefill_tokens[i] = steps[i].prefill_tokens
            decode_reqs[i] = len(steps[i].decoding)
        return StepResult(duration, tokens, prefill_tokens, decode_reqs, work)

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
                prealloc=len(r.prealloc),
                prealloc_tokens=sum(q.prompt_tokens for q in r.prealloc.values()),
                transfer=len(r.transfer),
                transfer_kv_tokens=sum(q.kv for q in r.transfer.values()),
                held=len(r.held),
                **(r.cache.stats(self._steps) if r.cache is not None else {}),
            )
            for i, r in enumerate(self._ranks)
        ]

    def rank_gauges(self) -> list[tuple[int, int, float]]:
        """Per rank, index = DP rank: ``(running, waiting, kv_usage)`` of :meth:`rank_stats`, the figures a scrape of
        the engine's metrics reads, without the rest of the snapshot."""
        cap = self.config.kv_capacity_tokens
        return [(len(r.running), len(r.waiting), r.kv_used / cap) for r in self._ranks]

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

    def _join_limits(self, active: list[int]) -> list[int | None]:
        """Per rank, the highest ``ready_step`` a waiting request may have to join this step; None = any.

        Without join lag every request may join. With it, a request that arrived during the running step waits
        one more, unless its rank has nothing else to run (vLLM) or the whole instance has nothing else (SGLang).
        Only the ``active`` ranks (:meth:`_active_ranks`) can have anything to run.
        """
        if not self.config.join_lag_steps:
            return [None] * self.dp_size
        index = self._steps
        ranks = self._ranks
        busy = [i for i in active if ranks[i].running or any(q.ready_step <= index for q in ranks[i].waiting.values())]
        if self.config.idle_rank_joins_next_step:
            limits: list[int | None] = [None] * self.dp_size
            for i in busy:
                limits[i] = index
            return limits
        limit = index if busy else None
        return [limit] * self.dp_size

    # --- stage 3: emit the step's tokens, and the lockstep step's cost ----------------------------------------

    def _finish(self, rank: Rank, out: RankStep) -> list[TokenEvent]:
        """Emit the decoded requests' tokens, then move completed prefills to running and emit theirs."""
        tokens = [self._emit(rank, req) for req in out.decoding]
        for req in out.completed:
            del rank.waiting[req.request_id]
            rank.running[req.request_id] = req
            tokens.append(self._emit(rank, req))
        return tokens

    def _emit(self, rank: Rank, req: Request) -> TokenEvent:
        generated = req.generated
        finished = generated + 1 == req.output_tokens
        event = TokenEvent(req.request_id, req.rank, generated, finished)
        if req.kv % self.config.kv_block_size == 0:
            rank.kv_blocks += 1
        req.generated = generated + 1
        req.kv += 1
        rank.kv_used += 1
        if rank.cache is not None:
            rank.fit_cache()
        if finished:
            del rank.running[req.request_id]
            if req.hold_kv:
                self._admission.hold(rank, req)
                rank.held[req.request_id] = req
                self._held_now.append(req)
            else:
                self._release(rank, req)
        return event

    def _release(self, rank: Rank, req: Request) -> None:
        del self._requests[req.request_id]
        rank.free_kv(req)
        self._admission.release(rank, req)

    def _duration(self, steps: list[RankStep], active: list[int]) -> tuple[float, list[float]]:
        """Step time and each rank's work: all-to-all + max over ranks of own work + mean of the EP-shared part
        (``routed_expert_fraction`` of each rank's linear cost: its prefill tokens' and decoded requests').

        Only the ``active`` ranks work; the others' own work and shared part are 0 (a float sum is unchanged by
        adding 0.0, so summing the active ranks' parts alone gives the same mean)."""
        cfg = self.config
        n = self.dp_size
        share = cfg.routed_expert_fraction
        work = [0.0] * n
        if not share:
            for i in active:
                work[i] = steps[i].work_s
            return cfg.alltoall_s + max(work), work
        shared = [
            share * (cfg.prefill_token_s * steps[i].prefill_tokens + cfg.decode_req_s * len(steps[i].decoding))
            for i in active
        ]
        mean_shared = sum(shared) / n
        work = [mean_shared] * n
        for i, sh in zip(active, shared, strict=True):
            work[i] = steps[i].work_s - sh + mean_shared
        return cfg.alltoall_s + max(work), work
