"""FairBatching's batch formation (``EngineModelConfig.batching="fairbatching"``): a step bounded by time, not tokens.

Our reading of FairBatching (Lyu et al., arXiv 2510.14392; only its abstract and third-party summaries were
readable; details in :attr:`gateway.sim.calibration.EngineModelConfig.batching`): token j of a request is due at
``arrival + ttft_slo_s + j x tpot_slo_s``; the step's time budget is the least slack over the instance's decoding
requests, between ``tpot_slo_s`` and half of ``ttft_slo_s``; the decodes due before the budget plus one
``tpot_slo_s`` always run, prefill fills the rest of the budget FCFS, and the decodes with more slack run in what
time is left. Time is the engine's own step cost; arrival is on the engine's clock (the sum of its step times).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from gateway.sim.calibration import EngineModelConfig
from gateway.sim.engine.composition import Composition
from gateway.sim.engine.prefill_alignment import PrefillGate
from gateway.sim.engine.rank import Rank, RankStep, Request


class FairBatching:
    """FairBatching's step on one rank, and the instance's time budget it runs under.

    Args:
        config: the engine model's settings (``ttft_slo_s``, ``tpot_slo_s`` and the step costs).
        composition: the step rules whose FCFS prefill it uses.
    """

    def __init__(self, config: EngineModelConfig, composition: Composition) -> None:
        self.config = config
        self._composition = composition

    def budget_s(self, ranks: Sequence[Rank], now: float) -> float:
        """The step's time budget at engine time ``now``: the least slack over the instance's running (decoding)
        requests, at most half the TTFT objective (so a request arriving during a step can still have its prefill in
        the next within its objective) and at least one TPOT objective, seconds; half the TTFT objective when nothing
        decodes."""
        cfg = self.config
        least = min((self._due_s(r) - now for rank in ranks for r in rank.running.values()), default=math.inf)
        return max(min(least, cfg.ttft_slo_s / 2), cfg.tpot_slo_s)

    def step(
        self, rank: Rank, limit: int | None, gate: PrefillGate, budget_s: float, now: float, step: int
    ) -> RankStep:
        """The decodes that cannot wait run, prefill fills the step's time budget FCFS, and the decodes with slack
        run in what time is left."""
        cfg = self.config
        out = RankStep()
        by_slack = sorted(rank.running.values(), key=lambda r: self._due_s(r) - now)
        urgent = [r for r in by_slack if self._due_s(r) - now < budget_s + cfg.tpot_slo_s]
        spare = by_slack[len(urgent) :]
        left = budget_s - cfg.alltoall_s - cfg.decode_s(len(urgent), sum(r.kv for r in urgent))
        prefill_s = 0.0
        if gate != "closed" and left > 0:
            tokens = self._tokens_in_time(rank, limit, gate == "admitted", left)
            if tokens:
                prefill_s = self._composition.prefill(rank, tokens, out, limit, step, admitted_only=gate == "admitted")
        left -= prefill_s
        out.decoding = list(urgent)
        for req in spare:
            cost = cfg.decode_s(1, req.kv)
            if cost > left:
                break
            out.decoding.append(req)
            left -= cost
        if out.decoding:
            out.work_s += cfg.decode_s(len(out.decoding), sum(r.kv for r in out.decoding))
        out.work_s += prefill_s
        return out

    def _due_s(self, req: Request) -> float:
        """The deadline of ``req``'s next token: ``arrival + ttft_slo + j x tpot_slo``, engine seconds."""
        return req.arrival_s + self.config.ttft_slo_s + req.generated * self.config.tpot_slo_s

    def _tokens_in_time(self, rank: Rank, limit: int | None, admitted_only: bool, seconds: float) -> int:
        """Prompt tokens FCFS prefill can take in ``seconds`` of work (the chunk cost of
        :meth:`EngineModelConfig.prefill_chunk_s` solved for the chunk), in the order
        :meth:`Composition.prefill <gateway.sim.engine.composition.Composition.prefill>` takes them."""
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
