"""Admission, preemption and retraction: when a waiting request may start prefill, and what frees KV when it runs out.

One policy per ``EngineModelConfig.admission`` (sources in :attr:`gateway.sim.calibration.EngineModelConfig.admission`);
each also needs a running slot under ``max_running_requests``, and a request admission refuses blocks everything
behind it (head-of-line blocking):

- ``reserve_output`` (:class:`ReserveOutput`, idealised): the prompt plus the true output fit the unreserved KV, so
  nothing is ever preempted;
- ``sglang`` (:class:`SGLangAdmission`): SGLang's new-token ratio, with retraction in a decode step that lacks KV;
- ``vllm`` (:class:`VLLMAdmission`): vLLM's block allocation, with preemption of the newest running request.

A preempted or retracted request loses its KV and prefills its prompt plus its output so far again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from gateway.sim.calibration import EngineModelConfig
from gateway.sim.engine.rank import Rank, Request, ceil_div


class Admission(ABC):
    """The rules every admission shares; a subclass adds its KV check (:meth:`_fits`, :meth:`could_admit`).

    Args:
        config: the engine model's settings.
    """

    def __init__(self, config: EngineModelConfig) -> None:
        self.config = config
        self._admissions = 0

    @abstractmethod
    def could_admit(self, rank: Rank, head: Request) -> bool:
        """Whether the KV check would admit ``head``, the first waiting request (SGLang's PrefillDelayer asks)."""

    @abstractmethod
    def _fits(self, rank: Rank, req: Request, chunk: int) -> bool:
        """Whether ``req`` may be admitted with a first chunk of ``chunk`` tokens, taking what the rule reserves."""

    def prefill_pass(self, rank: Rank) -> PrefillAdder | None:
        """The per-pass KV budget of a prefill pass on ``rank`` (SGLang's), or None."""
        return None

    def admit(self, rank: Rank, req: Request, chunk: int) -> bool:
        """Admit ``req`` (it may start prefill) if a running slot is free and the KV check passes."""
        if rank.admitted >= self.config.max_running_requests:
            return False  # head-of-line blocking
        if not self._fits(rank, req, chunk):
            return False
        req.admitted = True
        rank.admitted += 1
        self._admissions += 1
        req.admit_seq = self._admissions
        return True

    def release(self, rank: Rank, req: Request) -> None:
        """``req`` left the rank or was preempted, its KV freed: it no longer counts as admitted."""
        if req.admitted:
            req.admitted = False
            rank.admitted -= 1

    def adopt(self, rank: Rank, req: Request) -> None:
        """``req`` starts decoding on ``rank`` without a prefill there (P/D decode, its KV fetched): it takes a running
        slot as if admitted."""
        req.admitted = True
        rank.admitted += 1

    def hold(self, rank: Rank, req: Request) -> None:
        """``req`` finished on a P/D prefill rank and keeps its KV for the decode side: its running slot is free."""
        self.release(rank, req)

    def drop_held(self, rank: Rank, req: Request) -> None:
        """The KV ``req`` held (see :meth:`hold`) is freed."""
        return

    def decode_batch(self, rank: Rank) -> list[Request]:
        """The running requests a SGLang decode step runs: all of them, unless the rule retracts some."""
        return list(rank.running.values())

    def allocate(
        self, rank: Rank, req: Request, tokens: int, candidates: list[Request], index: int, preempted: set[str]
    ) -> None:
        """Allocate the KV of ``tokens`` of ``req``, ``candidates[index]`` in a vLLM step, preempting later
        candidates (added to ``preempted``) if the rule does; nothing to do unless it does."""
        return

    def _preempt(self, rank: Rank, req: Request, front: bool) -> None:
        """Free ``req``'s KV and queue it to prefill its prompt and output so far again (vLLM at the front of the
        queue, SGLang's retraction at the back)."""
        rank.running.pop(req.request_id, None)
        rank.waiting.pop(req.request_id, None)
        rank.free_kv(req)
        self.release(rank, req)
        req.kv = 0
        req.prefilled = 0
        req.prefill_target = req.prompt_tokens + req.generated
        req.ready_step = 0
        rank.preemptions += 1
        if front:
            rank.waiting = {req.request_id: req, **rank.waiting}
        else:
            rank.waiting[req.request_id] = req


class ReserveOutput(Admission):
    """Idealised: admitted when its prompt plus its true output fit the KV no admitted request reserved."""

    def could_admit(self, rank: Rank, head: Request) -> bool:
        return rank.kv_reserved + head.kv_reservation <= self.config.kv_capacity_tokens

    def _fits(self, rank: Rank, req: Request, chunk: int) -> bool:
        if rank.kv_reserved + req.kv_reservation > self.config.kv_capacity_tokens:
            return False
        rank.kv_reserved += req.kv_reservation
        return True

    def release(self, rank: Rank, req: Request) -> None:
        if req.admitted:
            rank.kv_reserved -= req.kv_reservation
        super().release(rank, req)

    def adopt(self, rank: Rank, req: Request) -> None:
        rank.kv_reserved += req.kv_reservation
        super().adopt(rank, req)

    def hold(self, rank: Rank, req: Request) -> None:
        super().hold(rank, req)
        rank.kv_reserved += req.kv  # the held KV stays unavailable to admission

    def drop_held(self, rank: Rank, req: Request) -> None:
        rank.kv_reserved -= req.kv


class SGLangAdmission(Admission):
    """SGLang: prompt plus ``min(max_new_tokens, clip)`` fit the free KV less the running requests' remaining
    ``max_new_tokens`` times the new-token ratio (``PrefillAdder``); a decode step without room retracts."""

    def __init__(self, config: EngineModelConfig) -> None:
        super().__init__(config)
        ratio = config.new_token_ratio
        self._decay, self._floor = ratio.decay, ratio.floor  # properties of the (frozen) settings, read once

    def could_admit(self, rank: Rank, head: Request) -> bool:
        remaining = head.prefill_target - head.prefilled
        free = self.config.kv_capacity_tokens - rank.kv_used
        return remaining + self.max_new(head) < free - self.running_offset(rank)

    def _fits(self, rank: Rank, req: Request, chunk: int) -> bool:
        return True  # the pass's KV budget checked it (PrefillAdder.take)

    def prefill_pass(self, rank: Rank) -> PrefillAdder:
        return PrefillAdder(self, rank)

    def max_new(self, req: Request) -> int:
        """The tokens SGLang expects ``req`` may still generate: ``max_new_tokens`` less its output, clipped."""
        return min(max(req.max_new_tokens - req.generated, 0), self.config.new_token_ratio.clip_max_new_tokens)

    def running_offset(self, rank: Rank) -> float:
        """KV tokens SGLang holds back for the running requests' future output (``PrefillAdder``): each one's
        remaining clipped ``max_new_tokens`` times the new-token ratio (1 for ``ignore_eos`` requests)."""
        ratio = rank.new_token_ratio
        return sum(self.max_new(r) * (1.0 if r.ignore_eos else ratio) for r in rank.running.values())

    def decode_batch(self, rank: Rank) -> list[Request]:
        """If the KV cannot take one more token each, retract requests (fewest output tokens first, then longest
        prompt; at least one, never the last) and re-estimate the new-token ratio from the kept ones; else the ratio
        decays one step (sglang/srt/managers/schedule_batch.py ``retract_decode``)."""
        cfg = self.config
        decoding = list(rank.running.values())
        if not decoding:
            return decoding
        if cfg.kv_capacity_tokens - rank.kv_used >= len(decoding):
            rank.new_token_ratio = max(rank.new_token_ratio - self._decay, self._floor)
            return decoding
        ratio = cfg.new_token_ratio
        keep = sorted(decoding, key=lambda r: (r.generated, -r.prompt_tokens), reverse=True)
        while len(keep) > 1:
            self._preempt(rank, keep.pop(), front=False)
            if cfg.kv_capacity_tokens - rank.kv_used >= len(keep):
                break
        decoded = sum(r.generated for r in keep)
        max_new = sum(r.max_new_tokens for r in keep)
        rank.new_token_ratio = min(1.0, (decoded + ratio.retract_decode_steps * len(keep)) / (max_new + 1))
        return [r for r in decoding if r.request_id in rank.running]


class PrefillAdder:
    """SGLang's KV budget of one prefill pass on a rank (``PrefillAdder``): the free KV, taken once per pass, less
    what the running requests and each request added so far may still generate."""

    def __init__(self, admission: SGLangAdmission, rank: Rank) -> None:
        self._admission = admission
        self._rank = rank
        self._offset = admission.running_offset(rank)
        self._free = admission.config.kv_capacity_tokens - rank.kv_used

    def take(self, req: Request, remaining: int, chunk: int) -> int:
        """The tokens of ``chunk`` that ``req``, with ``remaining`` still to prefill, may prefill in this pass; 0 or
        less ends the pass (a request not yet admitted that does not fit: SGLang's ``NO_TOKEN``)."""
        need = remaining + self._admission.max_new(req)
        if not req.admitted and need >= self._free - self._offset:
            return 0
        self._offset += need
        return min(chunk, self._admission.config.kv_capacity_tokens - self._rank.kv_used)


class VLLMAdmission(Admission):
    """vLLM: the KV blocks of the tokens scheduled this step fit the free blocks; a running request that cannot get
    a block preempts the newest running request (vllm/v1/core/sched/scheduler.py ``schedule``,
    ``_preempt_request``)."""

    def could_admit(self, rank: Rank, head: Request) -> bool:
        chunk = min(head.prefill_target - head.prefilled, self.config.max_prefill_tokens_per_step)
        return self._blocks_needed(head, chunk) <= self._free_blocks(rank)

    def _fits(self, rank: Rank, req: Request, chunk: int) -> bool:
        return self._blocks_needed(req, chunk) <= self._free_blocks(rank)

    def allocate(
        self, rank: Rank, req: Request, tokens: int, candidates: list[Request], index: int, preempted: set[str]
    ) -> None:
        while self._blocks_needed(req, tokens) > self._free_blocks(rank):
            victim = next(v for v in reversed(candidates[index:]) if v.request_id not in preempted)
            self._preempt(rank, victim, front=True)
            preempted.add(victim.request_id)
            if victim is req:
                break

    def _blocks_needed(self, req: Request, tokens: int) -> int:
        size = self.config.kv_block_size
        return ceil_div(req.kv + tokens, size) - ceil_div(req.kv, size)

    def _free_blocks(self, rank: Rank) -> int:
        return self.config.kv_capacity_tokens // self.config.kv_block_size - rank.kv_blocks


def admission_for(config: EngineModelConfig) -> Admission:
    """The admission policy ``config.admission`` names."""
    if config.admission == "sglang":
        return SGLangAdmission(config)
    if config.admission == "vllm":
        return VLLMAdmission(config)
    return ReserveOutput(config)
