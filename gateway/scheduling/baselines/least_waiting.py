"""``least_waiting``: the rank with the fewest requests waiting for prefill, in the style of the queue scorer of
the Kubernetes Gateway API Inference Extension's endpoint picker (used alone, without its other scorers), which
scores an endpoint by its waiting-queue size.

Unlike ``shortest_queue`` it ignores running (decoding) requests: a rank decoding many requests but with an empty
queue starts a new prompt's prefill at its next step. The figure is the load view's, so the requests the gateway
itself sent since the last scrape count. Ties go to the rank after the one chosen last.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.scheduling.baselines.base import Rotating, serving
from gateway.scheduling.baselines.indexed import LiveRanks
from gateway.types import PendingRequest, RankKey, RankLoad


class LeastWaiting(Rotating):
    name = "least_waiting"

    def choose(self, request: PendingRequest, ranks: Sequence[RankLoad]) -> RankKey | None:
        return self._pick(serving(request, ranks), lambda r: r.waiting)

    def choose_live(self, request: PendingRequest, live: LiveRanks) -> RankKey | None:
        return self._pick_live(request, live, lambda r: r.waiting)
