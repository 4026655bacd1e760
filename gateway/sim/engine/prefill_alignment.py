"""The engines' own prefill alignment across DP ranks: what prefill each rank may run in a step.

Both off by default (sources and defaults in :class:`gateway.sim.calibration.EngineModelConfig`):

- SGLang's PrefillDelayer (``enable_prefill_delayer``; SGLang 0.5.23 sglang/srt/managers/prefill_delayer.py): before
  each pass the ranks all-gather whether each could prefill; while some but not all can, or while a rank's free
  running slots are fewer than the largest recent prefill batch, every rank holds new prefill (a rank part-way
  through a chunked prompt continues it) for a bounded number of passes;
- vLLM's ``--prefill-schedule-interval N`` (``prefill_schedule_interval``; vLLM 0.34.0, PR #44558): a rank with
  decodes prefills only on every Nth step of the instance's busy period, the same steps on every rank, unless its
  last prefill-carrying step left requests waiting.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Literal

from gateway.sim.calibration import EngineModelConfig
from gateway.sim.engine.admission import Admission
from gateway.sim.engine.rank import Rank, RankStep, Request
from gateway.sim.engine_defaults import SGLANG_PREFILL_DELAYER_MAX_PREFILL_BS_WINDOW

PrefillGate = Literal["open", "admitted", "closed"]
"""What prefill a rank may run in a step: any (``open``), only requests already admitted, i.e. the rest of a chunked
prompt (``admitted``), or none (``closed``)."""


class PrefillAlignment:
    """The alignment state of one engine instance, asked before each step (:meth:`gates`) and told what it ran
    (:meth:`after_step`).

    Args:
        config: the engine model's settings.
        ranks: the instance's DP ranks, index = DP rank.
        admission: the instance's admission rule (the PrefillDelayer asks whether a rank's queue head passes it).
    """

    def __init__(self, config: EngineModelConfig, ranks: Sequence[Rank], admission: Admission) -> None:
        self.config = config
        self._ranks = ranks
        self._admission = admission
        dp_size = len(ranks)
        self._delayed_passes: int | None = None  # SGLang PrefillDelayer: passes held so far (None = not holding)
        self._skip_first_delay = True  # SGLang PrefillDelayer: the first slot-condition hold is skipped
        self._delayer_attempts = [0] * dp_size  # SGLang PrefillDelayer: this pass's attempted prefill batch per rank
        # SGLang PrefillDelayer: requests per recent prefill attempt, per rank
        self._recent_prefill_bs: list[deque[int]] = [
            deque(maxlen=SGLANG_PREFILL_DELAYER_MAX_PREFILL_BS_WINDOW) for _ in range(dp_size)
        ]
        self._prefill_capacity_bound = [
            False
        ] * dp_size  # vLLM: a rank's last prefill-carrying step left requests waiting
        self._busy_steps = 0  # steps since the instance was last idle (vLLM's DP step_counter)
        self._last_prefill_step = -config.prefill_schedule_interval  # vLLM's local cadence (one rank)

    def gates(self, limits: list[int | None], step: int) -> list[PrefillGate]:
        """Per rank, what prefill the alignment lets it run in step ``step``, given the join ``limits`` (the highest
        ``ready_step`` a waiting request may have to join; None = any). Both off: every rank open."""
        cfg = self.config
        gates: list[PrefillGate] = ["open"] * len(self._ranks)
        if cfg.enable_prefill_delayer and self._prefill_delayer_holds(limits):
            gates = ["admitted"] * len(self._ranks)
        if cfg.prefill_schedule_interval > 1 and self._off_cadence(step):
            gates = [
                "closed" if r.running and not bound else g
                for r, bound, g in zip(self._ranks, self._prefill_capacity_bound, gates, strict=True)
            ]
        return gates

    def after_step(self, gates: list[PrefillGate], limits: list[int | None], steps: list[RankStep], step: int) -> None:
        """Update the state from what step ``step`` ran: SGLang's recent prefill batch sizes (the actual batch, or the
        attempted one when held), vLLM's per-rank ``prefill_capacity_bound``, one rank's last prefill step and the
        busy period's step count."""
        cfg = self.config
        if cfg.enable_prefill_delayer:
            for recent, attempt, rank_step in zip(self._recent_prefill_bs, self._delayer_attempts, steps, strict=True):
                observed = rank_step.prefill_reqs or attempt
                if observed > 0:
                    recent.append(observed)
        if cfg.prefill_schedule_interval > 1:
            for i, (rank, gate, limit) in enumerate(zip(self._ranks, gates, limits, strict=True)):
                if gate != "closed":
                    self._prefill_capacity_bound[i] = any(
                        not q.admitted and (limit is None or q.ready_step <= limit) for q in rank.waiting.values()
                    )
            if any(s.prefill_tokens for s in steps):
                self._last_prefill_step = step + 1
        self._busy_steps += 1

    def idle(self) -> None:
        """The instance has nothing to run: vLLM's next DP wave starts with ``step_counter`` 0."""
        self._busy_steps = 0

    def _off_cadence(self, step: int) -> bool:
        """vLLM: whether step ``step`` is off the prefill cadence. Under DP the ranks share a step counter that
        restarts when the instance goes idle (``step_counter % N != 0``); one rank counts from its last
        prefill-carrying step."""
        interval = self.config.prefill_schedule_interval
        if len(self._ranks) > 1:
            return self._busy_steps % interval != 0
        return (step + 1) - self._last_prefill_step < interval

    def _prefill_delayer_holds(self, limits: list[int | None]) -> bool:
        """SGLang PrefillDelayer's negotiation for this pass (``_negotiate_should_allow_prefill_pure``): True holds
        new prefill on every rank. Records each rank's attempted prefill batch for the ``max_prefill_bs`` tracker."""
        cfg = self.config
        watermark = cfg.prefill_delayer_token_usage_low_watermark
        prefillable: list[bool] = []
        force = False
        self._delayer_attempts = [0] * len(self._ranks)
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
            max_prefill_bs = max(max(recent, default=0) for recent in self._recent_prefill_bs)
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

    def _can_prefill(self, rank: Rank, limit: int | None) -> bool:
        """Whether ``rank`` would put a request in a prefill batch this pass: one part-way through its prompt, or the
        first waiting one if it passes admission (a running slot and the admission rule's KV check)."""
        head: Request | None = None
        for req in rank.waiting.values():
            if limit is not None and req.ready_step > limit:
                continue
            if req.admitted:
                return True
            head = req
            break
        if head is None or rank.admitted >= self.config.max_running_requests:
            return False
        return self._admission.could_admit(rank, head)
