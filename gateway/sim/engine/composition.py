"""What one DP rank runs in a step, by ``EngineModelConfig.step_composition``.

- idealised: every running request decodes one token and waiting requests prefill FCFS up to
  ``max_prefill_tokens_per_step``, chunking a long prompt over several steps; decode tokens are not counted;
- SGLang: a prefill batch if one can be formed (the rank's decodes wait the step), else a decode batch; with
  ``enable_mixed_chunk`` the decodes ride along and their tokens come out of the chunk budget
  (sglang/srt/managers/scheduler.py ``get_next_batch_to_run``);
- vLLM: running requests first (decodes, then unfinished chunked prefills), then new ones, under one token budget
  (vllm/v1/core/sched/scheduler.py ``Scheduler.schedule``); Sarathi-Serve's stall-free batching is this step.

Sources and defaults in :class:`gateway.sim.calibration.EngineModelConfig`. Prefill admits waiting requests by the
admission rule (:mod:`gateway.sim.engine.admission`) and looks them up in the rank's prefix cache first
(:mod:`gateway.sim.engine.prefix_cache`); the prefill gate (:mod:`gateway.sim.engine.prefill_alignment`) limits what
prefill may run. A step returns the rank's plan (:class:`gateway.sim.engine.rank.RankStep`); the engine model emits
its tokens.
"""

from __future__ import annotations

from gateway.sim.calibration import EngineModelConfig
from gateway.sim.engine.admission import Admission
from gateway.sim.engine.prefill_alignment import PrefillGate
from gateway.sim.engine.rank import Rank, RankStep, Request, ceil_div


class Composition:
    """The step rules of each flavour and the FCFS prefill they share.

    Args:
        config: the engine model's settings.
        admission: the admission rule prefill admits by.
    """

    def __init__(self, config: EngineModelConfig, admission: Admission) -> None:
        self.config = config
        self._admission = admission

    def idealised(self, rank: Rank, limit: int | None, gate: PrefillGate, step: int) -> RankStep:
        """Decode every running request and prefill FCFS up to the budget, decode tokens not counted."""
        cfg = self.config
        out = RankStep(decoding=list(rank.running.values()))
        if out.decoding:
            out.work_s += cfg.decode_s(len(out.decoding), sum(r.kv for r in out.decoding))
        budget = 0 if gate == "closed" else cfg.max_prefill_tokens_per_step
        out.work_s += self.prefill(rank, budget, out, limit, step, admitted_only=gate == "admitted")
        return out

    def sglang(self, rank: Rank, limit: int | None, gate: PrefillGate, step: int) -> RankStep:
        """SGLang: a prefill batch if one can be formed (the rank's decodes wait), else a decode batch; with
        ``enable_mixed_chunk`` the decodes ride along and their tokens come out of the chunk budget."""
        cfg = self.config
        out = RankStep()
        mixed = cfg.enable_mixed_chunk and bool(rank.running)
        budget = cfg.max_prefill_tokens_per_step - (len(rank.running) if mixed else 0)
        if gate == "closed":
            budget = 0
        prefill_s = (
            self.prefill(rank, budget, out, limit, step, admitted_only=gate == "admitted") if budget > 0 else 0.0
        )
        if out.prefill_tokens == 0 or mixed:
            out.decoding = self._admission.decode_batch(rank)
            if out.decoding:
                out.work_s += cfg.decode_s(len(out.decoding), sum(r.kv for r in out.decoding))
        out.work_s += prefill_s
        return out

    def vllm(self, rank: Rank, limit: int | None, gate: PrefillGate, step: int) -> RankStep:
        """vLLM: running requests first (decodes, then unfinished chunked prefills), each allocating the KV blocks
        of its tokens (vLLM's admission preempts the newest running request when none are free); then, if nothing
        was preempted, new requests FCFS; one token budget for all."""
        cfg = self.config
        out = RankStep()
        budget = cfg.max_prefill_tokens_per_step
        candidates = list(rank.running.values())
        if gate != "closed":
            candidates += [q for q in rank.waiting.values() if q.admitted]
        preempted: set[str] = set()
        chunks: list[tuple[Request, int]] = []
        for i, req in enumerate(candidates):
            if budget == 0:
                break
            if req.request_id in preempted:
                continue
            is_decode = req.request_id in rank.running
            n = 1 if is_decode else min(req.prefill_target - req.prefilled, budget)
            self._admission.allocate(rank, req, n, candidates, i, preempted)
            if req.request_id in preempted:
                break
            if is_decode:
                out.decoding.append(req)
            else:
                chunks.append((req, n))
            budget -= n
        if out.decoding:
            out.work_s += cfg.decode_s(len(out.decoding), sum(r.kv for r in out.decoding))
        for req, n in chunks:
            out.work_s += self.run_chunk(rank, req, n, out, step)
            if req.prefilled == req.prefill_target:
                out.completed.append(req)
        if not preempted and budget > 0 and gate == "open":
            out.work_s += self.prefill(rank, budget, out, limit, step, new_only=True)
        return out

    def prefill(
        self,
        rank: Rank,
        budget: int,
        out: RankStep,
        limit: int | None,
        step: int,
        new_only: bool = False,
        admitted_only: bool = False,
    ) -> float:
        """Prefill FCFS up to ``budget`` tokens of the waiting requests that may join (``ready_step <= limit``),
        admitting requests by the admission rule (none with ``admitted_only``; only those with ``new_only``);
        appends requests whose prefill completes to ``out.completed``. Returns seconds (none with nothing waiting,
        and no state changes)."""
        if not rank.waiting:
            return 0.0
        adder = self._admission.prefill_pass(rank)
        work = 0.0
        tried: Request | None = None  # the last request that looked up the prefix cache
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
                tokens, blocks = rank.cache.hit(req, step)
                rank.kv_used += tokens
                rank.kv_blocks += blocks
                tried = req
            remaining = req.prefill_target - req.prefilled
            chunk = min(remaining, budget)
            if adder is not None:
                chunk = adder.take(req, remaining, chunk)
                if chunk <= 0:
                    break  # SGLang: NO_TOKEN, or no KV left for the chunk
            if not req.admitted and not self._admission.admit(rank, req, chunk):
                break  # head-of-line blocking
            work += self.run_chunk(rank, req, chunk, out, step)
            budget -= chunk
            if req.prefilled == req.prefill_target:
                out.completed.append(req)
        if tried is not None and not tried.admitted and rank.cache is not None:
            # admission refused it: it holds nothing while it waits
            rank.cache.unhit(tried)
            rank.free_kv(tried)
            tried.kv = tried.prefilled = 0
        return work

    def run_chunk(self, rank: Rank, req: Request, chunk: int, out: RankStep, step: int) -> float:
        """Prefill ``chunk`` tokens of ``req``: KV grows, the step's counters too. Returns seconds."""
        cfg = self.config
        seconds = cfg.prefill_chunk_s(chunk, req.prefilled)
        if cfg.kv_block_size > 1:
            rank.kv_blocks += ceil_div(req.kv + chunk, cfg.kv_block_size) - ceil_div(req.kv, cfg.kv_block_size)
        else:
            rank.kv_blocks += chunk
        req.prefilled += chunk
        req.kv += chunk
        rank.kv_used += chunk
        out.prefill_tokens += chunk
        if rank.cache is not None:
            rank.cache.computed(req, chunk, step)
            rank.fit_cache()
        out.prefill_reqs += 1
        return seconds
