"""Priority classes and fair sharing between tenants inside the window (``tenants`` section; off by default).

When the window closes, :class:`ClassOrder` splits its batch by priority class (:attr:`PendingRequest.priority
<gateway.types.PendingRequest.priority>`, 0 the highest) and the scheduler places the classes one after the other,
highest first, each on a snapshot that counts the placements of the classes above it. Within a class the requests
are admitted to the allocator in the order of the virtual token counter below, while the prompt tokens admitted stay
below the free prefill capacity of the ranks serving their model (the same capacity the window's early close uses,
:func:`~gateway.scheduling.allocation.free_prefill_capacity`); the rest wait for the next window. Once a class leaves
a request waiting, every lower class waits whole, so under saturation the lowest class is deferred first.

The lowest class (when there are several) is *deferrable*: it is never forced onto a full rank after
``allocator.max_wait_s`` (it waits for room, up to ``window.queue_timeout_s``), and its capacity is ``queue_steps``
prefill budgets per rank without the ``allocator.min_queue_tokens`` floor. The engines run what is queued on a rank
in their own order (SGLang and vLLM: first come, first served by default), so batch work queued there delays the next
interactive request by as many steps as it fills: with SGLang's 1,024-token budget at DP 8 the 16,384-token floor
is 16 steps. Measured: ``bench/results/priorities.md``.

**Virtual token counter** (Sheng et al., "Fairness in Serving Large Language Models", OSDI 2024, arXiv 2401.00588,
Algorithm 2; the authors' artifact ``Ying1123/VTC-artifact``, ``slora/server/router/vtc_req_queue.py``). Each tenant
``i`` has a counter ``c_i`` of the service it received:

- *Selection and prompt charge*: while a new request can be added, take the tenant ``k = argmin c_i`` among those
  with requests waiting, admit its earliest request ``r`` and add ``c_k += w_p * n_prompt(r)``.
- *Output charge*: for every token generated for a request of tenant ``f``, ``c_f += w_q``.
- *Counter lift*: when a request of tenant ``u`` arrives and ``u`` has no request waiting, ``c_u = max(c_u,
  min{c_i : i has requests waiting})``; when no tenant has one, ``c_u = max(c_u, c_l)``, ``l`` the tenant that last
  left the queue. A tenant idle for a while thus cannot claim the service it did not use. (The artifact's
  ``append`` lifts only against tenants waiting; the empty-queue case follows the paper's algorithm.)

``w_p = 1`` and ``w_q = 2`` by default (the artifact's ``input_price`` and ``output_price``). With weights (the paper's
weighted VTC, §4.3; the artifact's ``fair_weights``) each increment is divided by the tenant's weight. Here the
"queue" is the window (a tenant waits while it has requests buffered), a request is charged its prompt when the
allocator places it (a request admitted but deferred by the allocator is not charged) and "can add a new request" is
the free-capacity bound above.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Mapping, Sequence

from gateway.scheduling.allocation import free_prefill_capacity
from gateway.types import PendingRequest, RankLoad


class VirtualTokenCounter:
    """The virtual token counter of each tenant (module docstring).

    Args:
        prompt_weight: ``w_p``, the cost of one prompt token (>= 0).
        output_weight: ``w_q``, the cost of one output token (>= 0).
        weights: a tenant's weight (> 0), 1 for a tenant not listed.
    """

    def __init__(self, prompt_weight: float = 1.0, output_weight: float = 2.0, weights: Mapping[str, float] = {}):
        self.prompt_weight = prompt_weight
        self.output_weight = output_weight
        self.weights = dict(weights)
        self.counters: dict[str, float] = {}
        self.waiting: dict[str, int] = {}
        self._last_left: str | None = None
        self._placed: dict[str, str] = {}

    def counter(self, tenant: str) -> float:
        """``c_tenant`` (0 for a tenant never seen)."""
        return self.counters.get(tenant, 0.0)

    def arrive(self, tenant: str) -> None:
        """A request of ``tenant`` entered the window; lift its counter if it had none waiting."""
        if self.waiting.get(tenant, 0) == 0:
            active = [self.counter(t) for t, n in self.waiting.items() if n > 0 and t != tenant]
            if active:
                floor = min(active)
            elif self._last_left is not None:
                floor = self.counter(self._last_left)
            else:
                floor = 0.0
            self.counters[tenant] = max(self.counter(tenant), floor)
        self.waiting[tenant] = self.waiting.get(tenant, 0) + 1

    def leave(self, tenant: str) -> None:
        """A request of ``tenant`` left the window (placed, unplaceable or cancelled)."""
        left = self.waiting.get(tenant, 0) - 1
        if left > 0:
            self.waiting[tenant] = left
        else:
            self.waiting.pop(tenant, None)
            self._last_left = tenant

    def order(self, requests: Iterable[PendingRequest]) -> list[PendingRequest]:
        """``requests`` in the order the selection rule admits them: repeatedly the earliest request of the tenant
        with the lowest counter, each charged its prompt provisionally (the counters themselves do not change).
        Ties go to the tenant whose next request arrived first, then by name."""
        queues: dict[str, deque[PendingRequest]] = {}
        for request in sorted(requests, key=lambda q: q.arrival_s):
            queues.setdefault(request.tenant, deque()).append(request)
        heap = [(self.counter(t), q[0].arrival_s, t) for t, q in queues.items()]
        heapq.heapify(heap)
        out: list[PendingRequest] = []
        while heap:
            counter, _, tenant = heapq.heappop(heap)
            queue = queues[tenant]
            request = queue.popleft()
            out.append(request)
            if queue:
                charge = self.prompt_weight * request.prompt_tokens / self.weights.get(tenant, 1.0)
                heapq.heappush(heap, (counter + charge, queue[0].arrival_s, tenant))
        return out

    def placed(self, request: PendingRequest) -> None:
        """``request`` was placed: charge its prompt, and its output tokens from now on (:meth:`on_tokens`)."""
        tenant = request.tenant
        weight = self.weights.get(tenant, 1.0)
        self.counters[tenant] = self.counter(tenant) + self.prompt_weight * request.prompt_tokens / weight
        self._placed[request.request_id] = tenant

    def on_tokens(self, request_id: str, n: int) -> None:
        """``n`` output tokens of a placed request came back: charge them to its tenant."""
        tenant = self._placed.get(request_id)
        if tenant is not None:
            self.counters[tenant] += self.output_weight * n / self.weights.get(tenant, 1.0)

    def on_finish(self, request_id: str) -> None:
        """A placed request ended: its tokens are no longer charged."""
        self._placed.pop(request_id, None)


def free_by_model(ranks: Sequence[RankLoad], queue_steps: float, min_tokens: float) -> dict[str, float]:
    """Free prefill capacity of the usable ranks serving each model, prompt tokens
    (:func:`~gateway.scheduling.allocation.free_prefill_capacity` over the ranks serving it)."""
    models = {m for r in ranks for m in r.models}
    return {m: free_prefill_capacity([r for r in ranks if m in r.models], queue_steps, min_tokens) for m in models}


class ClassOrder:
    """How a window's batch is placed by class (module docstring).

    Args:
        classes: the number of priority classes (>= 1).
        fairness: the tenants' virtual token counter, ``None`` for arrival order within a class.
        max_wait_s: the allocator's ``max_wait_s``: a request older than this is admitted whatever the capacity,
            except in the deferrable (lowest) class.
    """

    def __init__(self, classes: int, fairness: VirtualTokenCounter | None, max_wait_s: float) -> None:
        self.classes = classes
        self.fairness = fairness
        self.max_wait_s = max_wait_s
        self.deferrable = classes - 1 if classes > 1 else None

    def split(self, batch: Iterable[PendingRequest]) -> list[tuple[int, list[PendingRequest]]]:
        """The batch's requests by class, highest class first, each in arrival order (classes with none left out)."""
        tiers: dict[int, list[PendingRequest]] = {}
        for request in batch:
            tiers.setdefault(request.priority, []).append(request)
        return [(p, sorted(tiers[p], key=lambda q: q.arrival_s)) for p in sorted(tiers)]

    def admit(
        self, priority: int, tier: Sequence[PendingRequest], free: Mapping[str, float], now: float
    ) -> tuple[list[PendingRequest], list[PendingRequest]]:
        """Split one class's requests into those handed to the allocator now and those held for the next window.

        Requests go in the fair order (:meth:`VirtualTokenCounter.order`, else arrival order); one is admitted while
        the prompt tokens admitted before it for its model are below ``free[model]``, and the first that is not
        closes its model for this window. A request of a model ``free`` does not list is admitted (the allocator
        reports it unplaceable); one older than ``max_wait_s`` is admitted unless its class is the deferrable one.
        """
        order = self.fairness.order(tier) if self.fairness is not None else list(tier)
        may_force = priority != self.deferrable
        used: dict[str, float] = {}
        closed: set[str] = set()
        admitted: list[PendingRequest] = []
        held: list[PendingRequest] = []
        for request in order:
            model = request.model
            room = free.get(model)
            forced = may_force and now - request.arrival_s >= self.max_wait_s
            if room is None or forced or (model not in closed and used.get(model, 0.0) < room):
                admitted.append(request)
                used[model] = used.get(model, 0.0) + request.prompt_tokens
            else:
                closed.add(model)
                held.append(request)
        return admitted, held
