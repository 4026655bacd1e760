"""``phase_aware``: ``sbs``'s placement without its window, each request placed the moment it arrives.

The cost is ``sbs``'s own (:mod:`gateway.scheduling.phase`, ``phase_fill``: predicted time to first token from
each instance's step phase and the ranks' prefill already bound for the next step, with the same allocator
settings and decode-aware tie-break), applied to a batch of one request on arrival and with no capacity bound
(``queue_steps`` off), so it never defers. Comparing it with ``sbs`` measures what the window itself adds
(evaluation review, December 2026: about 0–7% of ``sbs``'s gain in the engine model). The placement comes from
the scheduler (:class:`~gateway.scheduling.baselines.base.StepPlacement`), which owns the step clock; the
request's arrival time stands for now, as an immediate policy places a request when it arrives.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.scheduling.baselines.base import PolicyContext, StepPlacement, serving
from gateway.scheduling.baselines.indexed import Candidates, LiveRanks, PerModel
from gateway.types import PendingRequest, RankKey, RankLoad


class PhaseAwareImmediate:
    """Raises ``ValueError`` when built without the scheduler's step placement."""

    name = "phase_aware"

    def __init__(self, context: PolicyContext) -> None:
        if context.steps is None:
            raise ValueError("phase_aware places by the scheduler's step clock: build it with steps=")
        self._steps: StepPlacement = context.steps
        self._candidates = PerModel(Candidates)

    def choose(self, request: PendingRequest, ranks: Sequence[RankLoad]) -> RankKey | None:
        if not serving(request, ranks):
            return None
        return self._steps.place(request, ranks, request.arrival_s)

    def choose_live(self, request: PendingRequest, live: LiveRanks) -> RankKey | None:
        candidates = self._candidates.get(live, request.model)
        candidates.sync()
        if not len(candidates):
            return None
        return self._steps.place(request, list(live.loads), request.arrival_s)
