"""The scheduler as a synchronous state machine: requests in, placements on DP ranks out.

It ties the pure pieces together (window, allocator or immediate policy, load view, step clock) with
time passed in, so the gateway's asyncio dispatcher and a virtual-time simulation drive the very same code:

- :meth:`Scheduler.submit` takes a request. An immediate-dispatch policy places it at once; ``sbs`` buffers it
  in the batch window.
- :meth:`Scheduler.poll` closes the window when it is due (its grid tick, or with ``step_aligned_close`` just
  before the next predicted step start of an instance, :mod:`gateway.scheduling.step_aligned_close`; at once when
  holding cannot help: an idle instance, engines that align their own prefill, or no company expected) and places
  its batch with the configured allocator (:data:`gateway.scheduling.allocators.ALLOCATORS`: phase-aware placement
  or water-filling, with the decode-aware choice).
- The driver reports what it sees through the scheduler and nothing else: each request's progress
  (:meth:`Scheduler.on_first_token`, :meth:`Scheduler.on_tokens`, :meth:`Scheduler.on_finish`) and the engines'
  scrapes (:meth:`Scheduler.on_scrape`, :meth:`Scheduler.on_scrape_failure`). Each updates the load view, feeds
  the step clock and re-arms the window's early closing in one place. Placements are recorded in the view here,
  so a burst cannot herd onto one rank between scrapes.

The two modes, immediate dispatch and the window, are two small classes behind one protocol
(:class:`_Immediate`, :class:`_Windowed`); the scheduler delegates ``submit`` and ``poll`` to the one its policy
chose.

Priority classes and tenants (:mod:`gateway.scheduling.fairness`, ``tenants`` section, off by default): ``sbs``
places a closed window's batch class by class, highest first, each class's tenants in the virtual token counter's
order; immediate policies place every request at once and ignore classes.

P/D disaggregated models (:mod:`gateway.scheduling.pd`): prompts are placed on prefill ranks only (every
snapshot a mode places from leaves the decode ranks out), by the mode or by ``pd.prefill_policy``; as each prefill
placement is recorded, the decode leg's rank is chosen (``pd.decode_policy``) and recorded too. The placement
returned is the prefill rank; :meth:`LoadView.decode_rank_of <gateway.load.view.LoadView.decode_rank_of>` gives
the decode rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gateway.config import (
    AllocatorConfig,
    DecodeConfig,
    PdConfig,
    PhaseAwareConfig,
    PolicyName,
    PrefixCacheConfig,
    TenantsConfig,
    WindowConfig,
)
from gateway.load.live import LiveLoads
from gateway.load.view import DECODE_ROLES, PREFILL_ROLES, LoadView
from gateway.scheduling.allocation import free_prefill_capacity
from gateway.scheduling.allocators import ALLOCATORS, Allocator
from gateway.scheduling.baselines import make_immediate_policy
from gateway.scheduling.baselines.base import ImmediatePolicy, LivePolicy
from gateway.scheduling.fairness import ClassOrder, VirtualTokenCounter, free_by_model
from gateway.scheduling.pd import choose_avoiding, decode_leg_policy, prefill_leg_policy
from gateway.scheduling.prefix_index import PrefixIndex
from gateway.scheduling.step_aligned_close import (
    CloseAtOnceReason,
    StepAlignedClosing,
    close_at_once_reason,
    next_step_starts,
)
from gateway.scheduling.step_clock import StepClock
from gateway.scheduling.types import Allocation
from gateway.scheduling.window import BatchWindow
from gateway.types import PendingRequest, RankKey, RankLoad, RankMetrics


class NoServingRankError(LookupError):
    """No usable DP rank serves the request's model."""


class WindowFullError(RuntimeError):
    """The window already holds its maximum of requests or prompt tokens."""


@dataclass(slots=True)
class WindowOutcome:
    """What closing one window did.

    Attributes:
        assigned: ``(request, rank)`` pairs placed now (already recorded in the load view).
        unplaceable: requests no usable rank serves; the driver answers them with an error.
        deferred: how many requests stay buffered for the next window.
    """

    assigned: list[tuple[PendingRequest, RankKey]] = field(default_factory=list)
    unplaceable: list[PendingRequest] = field(default_factory=list)
    deferred: int = 0


class _Mode(Protocol):
    """How requests are placed: at once, or in batches when the window closes."""

    batched: bool

    def submit(self, request: PendingRequest, now: float) -> RankKey | None: ...

    def poll(self, now: float) -> WindowOutcome | None: ...


class PhasePlacement:
    """The step-aware placement an immediate policy may use (``phase_aware``,
    :class:`~gateway.scheduling.baselines.base.StepPlacement`): the ``phase_aware`` allocator, with the scheduler's
    step clock, placing a batch of one request, its capacity bound off (``queue_steps`` ``None``), so a request is
    never deferred.

    Args:
        allocator: the allocator settings; a ``phase_aware`` section lends its settings, any other kind leaves
            the ``phase_aware`` defaults.
        decode: decode-aware choice settings, ``None`` when off.
        clock: the scheduler's step clock.
        prefix: the scheduler's prefix index, ``None`` when off.
    """

    def __init__(
        self,
        allocator: AllocatorConfig,
        decode: DecodeConfig | None,
        clock: StepClock,
        prefix: PrefixIndex | None = None,
    ) -> None:
        settings = allocator if isinstance(allocator, PhaseAwareConfig) else PhaseAwareConfig()
        self._allocator = ALLOCATORS["phase_aware"](
            settings.model_copy(update={"queue_steps": None}), decode, clock, prefix
        )

    def place(self, request: PendingRequest, ranks: Sequence[RankLoad], now: float) -> RankKey | None:
        assigned = self._allocator.place([request], ranks, now).assigned
        return assigned[0][1] if assigned else None


def record_dispatch(
    view: LoadView,
    prefix: PrefixIndex | None,
    request: PendingRequest,
    key: RankKey,
    now: float,
    cached: int | None = None,
) -> None:
    """Record that ``request`` goes to rank ``key``: the load view queues the prompt tokens the rank's prefix cache
    probably lacks (``cached``, or looked up in the index), and the index takes its blocks."""
    if prefix is not None:
        if cached is None:
            matched = prefix.match(request.prefix_blocks).get(key, 0)
            cached = prefix.cached_tokens(matched, request.prompt_tokens)
        prefix.insert(key, request.prefix_blocks)
    view.on_dispatch(
        request.request_id, key, request.prompt_tokens, now, stream=request.stream, cached_tokens=cached or 0
    )


def live_choice(
    view: LoadView, roles: frozenset[str], policy: ImmediatePolicy
) -> Callable[[PendingRequest, float], RankKey | None] | None:
    """``policy``'s choice at ``now`` from the live ranks of ``roles`` (:class:`~gateway.load.live.LiveLoads`), each
    choice taking in only the ranks that changed since the last; ``None`` when ``policy`` chooses from snapshots
    only. Its choice is the one ``policy.choose`` makes on ``view.snapshot(now, roles)``, with the same effect on the
    policy's state, so the two may be mixed (a retry avoiding failed ranks takes a snapshot)."""
    if not isinstance(policy, LivePolicy):
        return None
    live = LiveLoads(view, roles)
    choose = policy.choose_live

    def choice(request: PendingRequest, now: float) -> RankKey | None:
        live.refresh(now)
        return choose(request, live)

    return choice


class PdLegs:
    """Where the legs of P/D requests go (see the module docstring and :mod:`gateway.scheduling.pd`).

    Args:
        view: the load view.
        prefix: the prefix index (prefill placements are recorded in it), ``None`` when off.
        prefill: the prefill leg's own policy, ``None`` when the scheduler's mode places prompts.
        decode: the decode leg's policy.
    """

    def __init__(
        self, view: LoadView, prefix: PrefixIndex | None, prefill: ImmediatePolicy | None, decode: ImmediatePolicy
    ) -> None:
        self.view = view
        self.prefix = prefix
        self.prefill = prefill
        self.decode = decode
        pd = bool(view.pd_models)
        self._live_prefill = live_choice(view, PREFILL_ROLES, prefill) if pd and prefill is not None else None
        self._live_decode = live_choice(view, DECODE_ROLES, decode) if pd else None

    def choose_prefill(self, request: PendingRequest, now: float) -> RankKey | None:
        """The prefill leg's own policy's choice of a prefill rank for P/D request ``request``.

        Raises:
            ValueError: the legs have no prefill policy of their own.
        """
        if self.prefill is None:
            raise ValueError("the scheduler's mode places the prompts of P/D requests")
        if self._live_prefill is not None:
            return self._live_prefill(request, now)
        return self.prefill.choose(request, self.view.snapshot(now, PREFILL_ROLES))

    def is_pd(self, request: PendingRequest) -> bool:
        """Whether ``request``'s model is served P/D."""
        return request.model in self.view.pd_models

    def record(self, request: PendingRequest, key: RankKey, now: float, failed: set[RankKey] | None = None) -> bool:
        """Record ``request`` placed on rank ``key`` (for a P/D request: its prefill rank, after choosing and
        recording its decode rank, avoiding the ranks in ``failed``); return ``False``, recording nothing, when a
        P/D request finds no usable decode rank."""
        if not self.is_pd(request):
            record_dispatch(self.view, self.prefix, request, key, now)
            return True
        if not failed and self._live_decode is not None:
            decode = self._live_decode(request, now)
        else:
            decode = choose_avoiding(self.decode, request, self.view.snapshot(now, DECODE_ROLES), failed or set())
        if decode is None:
            return False
        record_dispatch(self.view, self.prefix, request, key, now)
        self.view.on_dispatch_decode(request.request_id, decode, request.prompt_tokens, now)
        return True


class _Immediate:
    """An immediate-dispatch baseline places each request the moment it arrives: a policy that can
    (:class:`~gateway.scheduling.baselines.base.LivePolicy`) from the live prefill ranks, which take in only the
    ranks that changed since the last request (:class:`~gateway.load.live.LiveLoads`), any other from a snapshot."""

    batched = False

    def __init__(self, policy: ImmediatePolicy, view: LoadView, legs: PdLegs) -> None:
        self.policy = policy
        self.view = view
        self.legs = legs
        self.live = live_choice(view, PREFILL_ROLES, policy)

    def submit(self, request: PendingRequest, now: float) -> RankKey | None:
        if self.live is not None:
            key = self.live(request, now)
        else:
            key = self.policy.choose(request, self.view.snapshot(now, PREFILL_ROLES))
        if key is None or not self.legs.record(request, key, now):
            raise NoServingRankError(request.model)
        return key

    def poll(self, now: float) -> WindowOutcome | None:
        return None


class _FreeCapacity:
    """:func:`~gateway.scheduling.allocation.free_prefill_capacity` of successive snapshots, each rank's share asked
    again only when its entry changed (the load view hands out the same entry while a rank's figures stand). The
    shares are summed in the snapshot's order, as the function sums them (a rank it skips adds 0), so the total is
    the same float.

    Args:
        queue_steps: a rank's capacity in per-step prefill budgets.
        min_tokens: a rank's capacity is at least this many prompt tokens.
    """

    def __init__(self, queue_steps: float, min_tokens: float) -> None:
        self.queue_steps = queue_steps
        self.min_tokens = min_tokens
        self._loads: list[RankLoad] = []
        self._shares: list[float] = []

    def __call__(self, snapshot: list[RankLoad]) -> float:
        loads, shares, steps, least = self._loads, self._shares, self.queue_steps, self.min_tokens
        if len(loads) != len(snapshot):
            loads[:] = snapshot
            shares[:] = [free_prefill_capacity((r,), steps, least) for r in snapshot]
        else:
            for i, r in enumerate(snapshot):
                if loads[i] is not r:
                    loads[i] = r
                    shares[i] = free_prefill_capacity((r,), steps, least)
        return sum(shares)


class _Windowed:
    """``sbs``: requests wait in the window, whose batch the allocator places when it closes."""

    batched = True

    def __init__(
        self,
        settings: WindowConfig,
        allocator: Allocator,
        queue_steps: float,
        min_queue_tokens: float,
        view: LoadView,
        window: BatchWindow,
        step_clock: StepClock,
        legs: PdLegs,
        aligned_engines: set[str],
        classes: ClassOrder | None = None,
    ) -> None:
        self.settings = settings
        self.classes = classes
        self.legs = legs
        self.allocator = allocator
        self.queue_steps = queue_steps
        self.min_queue_tokens = min_queue_tokens
        self.view = view
        self.window = window
        self.step_clock = step_clock
        self.aligned_engines = aligned_engines
        self.closed_at_once: dict[CloseAtOnceReason, int] = {"idle": 0, "engine_aligned": 0, "alone": 0}
        self.free_capacity = _FreeCapacity(queue_steps, min_queue_tokens)
        close = settings.step_aligned_close
        self.closing = (
            None
            if close is None
            else StepAlignedClosing(close.lead_s, settings.min_interval_s, settings.max_interval_s)
        )

    def submit(self, request: PendingRequest, now: float) -> RankKey | None:
        limits = self.settings
        if len(self.window) >= limits.max_buffered_requests:
            raise WindowFullError(f"the window holds its maximum of {limits.max_buffered_requests} requests")
        if self.window.buffered_tokens + request.prompt_tokens > limits.max_buffered_tokens:
            raise WindowFullError(f"the window holds its maximum of {limits.max_buffered_tokens} prompt tokens")
        opening = not len(self.window)
        self.window.add(request, now)
        if self.classes is not None and self.classes.fairness is not None:
            self.classes.fairness.arrive(request.tenant)
        if opening:
            snapshot = self.view.snapshot(now, PREFILL_ROLES)
            reason = close_at_once_reason(
                request,
                snapshot,
                self.aligned_engines,
                when_idle=limits.close_when_idle,
                yield_to_alignment=limits.yield_to_engine_alignment,
                expected_arrivals=self.window.expected_arrivals(),
                min_arrivals=limits.hold_min_arrivals,
            )
            if reason is None:
                self._align(snapshot)
            else:
                self.closed_at_once[reason] += 1
                self.window.close_now(now)
        return None

    def _align(self, snapshot: list[RankLoad]) -> None:
        """Time the open window's close to the instances' next step starts (``step_aligned_close``)."""
        opened = self.window.opened_s
        if self.closing is None or opened is None:
            return
        starts = next_step_starts(snapshot, self.step_clock)
        self.window.align(None if starts is None else self.closing.close_at(opened, starts))

    def poll(self, now: float) -> WindowOutcome | None:
        if not len(self.window):
            return None
        if self.settings.adaptive_interval:
            self.window.observe_step_time(self.step_clock.mean_step_s())
        snapshot = self.view.snapshot(now, PREFILL_ROLES)
        self._align(snapshot)
        if not self.window.due(now, self.free_capacity(snapshot)):
            return None
        if self.classes is not None:
            assigned, unplaceable, deferred = self._place_by_class(self.classes, snapshot, now)
        else:
            allocation = self.allocator.place(self.window.take(now), snapshot, now)
            assigned, unplaceable, deferred = [], list(allocation.unplaceable), allocation.deferred
            for request, key in allocation.assigned:
                if self.legs.record(request, key, now):
                    assigned.append((request, key))
                else:
                    unplaceable.append(request)
        self.window.requeue(deferred, now, placed_any=bool(assigned))
        if len(self.window):
            self._align(self.view.snapshot(now, PREFILL_ROLES))
        return WindowOutcome(assigned, unplaceable, len(deferred))

    def _place_by_class(
        self, classes: ClassOrder, snapshot: list[RankLoad], now: float
    ) -> tuple[list[tuple[PendingRequest, RankKey]], list[PendingRequest], list[PendingRequest]]:
        """Place the closed window's batch class by class (:mod:`gateway.scheduling.fairness`): each class on a
        snapshot counting the classes above it, its requests admitted by the fair order within the free capacity;
        once a class leaves requests waiting, the lower classes wait whole. Returns assigned pairs, unplaceable and
        deferred requests (arrival order)."""
        assigned: list[tuple[PendingRequest, RankKey]] = []
        unplaceable: list[PendingRequest] = []
        deferred: list[PendingRequest] = []
        fairness = classes.fairness
        for i, (priority, tier) in enumerate(classes.split(self.window.take(now))):
            if deferred:
                deferred += tier
                continue
            if i:
                snapshot = self.view.snapshot(now, PREFILL_ROLES)
            least = 0.0 if priority == classes.deferrable else self.min_queue_tokens
            free = free_by_model(snapshot, self.queue_steps, least)
            admitted, held = classes.admit(priority, tier, free, now)
            allocation = self.allocator.place(admitted, snapshot, now) if admitted else Allocation()
            for request, key in allocation.assigned:
                if self.legs.record(request, key, now):
                    assigned.append((request, key))
                    if fairness is not None:
                        fairness.placed(request)
                else:
                    unplaceable.append(request)
            unplaceable += allocation.unplaceable
            deferred += allocation.deferred + held
        if fairness is not None:
            for request, _ in assigned:
                fairness.leave(request.tenant)
            for request in unplaceable:
                fairness.leave(request.tenant)
        deferred.sort(key=lambda q: q.arrival_s)
        return assigned, unplaceable, deferred


class Scheduler:
    """Places requests on DP ranks with one policy.

    Args:
        policy: ``sbs`` or an immediate-dispatch baseline name
            (:data:`gateway.scheduling.baselines.IMMEDIATE_POLICIES`).
        view: the load view (shared with whoever feeds it scrapes and progress).
        window: window settings (used by ``sbs``).
        allocator: allocator settings (used by ``sbs``), built by :data:`~gateway.scheduling.allocators.ALLOCATORS`.
        decode: decode-aware choice settings (used by ``sbs``); ``None`` switches it off.
        prefix_cache: the prefix index's settings (every placement is recorded in it; ``sbs`` and ``phase_aware``
            place by it); ``None`` switches it off.
        seed: seed of randomised baselines.
        pd: how the legs of P/D models are placed (``pd`` section); used only when the view has P/D models.
        tenants: priority classes and fair sharing (``tenants`` section; used by ``sbs``); ``None``, the default,
            places every request alike.

    Raises:
        ValueError: unknown policy.
    """

    def __init__(
        self,
        policy: PolicyName,
        view: LoadView,
        *,
        window: WindowConfig,
        allocator: AllocatorConfig,
        decode: DecodeConfig | None,
        prefix_cache: PrefixCacheConfig | None = None,
        seed: int = 0,
        pd: PdConfig | None = None,
        tenants: TenantsConfig | None = None,
    ) -> None:
        self.policy = policy
        self.view = view
        self.step_clock = StepClock(window.initial_step_s)
        self.prefix = None if prefix_cache is None else PrefixIndex(prefix_cache.capacity_tokens)
        self.window = BatchWindow(
            min_interval_s=window.min_interval_s,
            max_interval_s=window.max_interval_s,
            step_fraction=window.step_fraction,
            initial_step_s=window.initial_step_s,
        )
        self._retry_policy = make_immediate_policy("vllm_internal", seed=seed)
        pd = pd or PdConfig()
        decode_policy = pd.decode_policy or ("sbs" if policy == "sbs" else policy)
        phase_aware = "phase_aware" in (policy, pd.prefill_policy, decode_policy)
        steps = PhasePlacement(allocator, decode, self.step_clock, self.prefix) if phase_aware else None
        # built whether or not a P/D model is served now: engines added at runtime may bring one (the legs are
        # asked only for a P/D model's requests)
        self.legs = PdLegs(
            view,
            self.prefix,
            prefill_leg_policy(pd.prefill_policy, seed, steps),
            decode_leg_policy(decode_policy, decode, seed, steps),
        )
        self._aligned: set[str] = set()
        self._mode: _Mode
        self.fairness: VirtualTokenCounter | None = None
        classes = None
        if tenants is not None and policy == "sbs":
            if tenants.fairness == "vtc":
                weights = {t.name: t.weight for t in tenants.tenants}
                self.fairness = VirtualTokenCounter(tenants.vtc_prompt_weight, tenants.vtc_output_weight, weights)
            classes = ClassOrder(len(tenants.classes), self.fairness, allocator.max_wait_s)
        if policy == "sbs":
            queue_steps = math.inf if allocator.queue_steps is None else allocator.queue_steps
            placer = ALLOCATORS[allocator.kind](allocator, decode, self.step_clock, self.prefix)
            self._mode = _Windowed(
                window,
                placer,
                queue_steps,
                allocator.min_queue_tokens,
                view,
                self.window,
                self.step_clock,
                self.legs,
                self._aligned,
                classes,
            )
        else:
            self._mode = _Immediate(make_immediate_policy(policy, seed=seed, steps=steps), view, self.legs)

    @property
    def batched(self) -> bool:
        """Whether requests wait in the window (``sbs``) rather than being placed on arrival."""
        return self._mode.batched

    def submit(self, request: PendingRequest, now: float) -> RankKey | None:
        """Take a new request: return its rank if it was placed at once, ``None`` if it waits in the window.

        Raises:
            NoServingRankError: (immediate policies) no usable rank serves the request's model.
            WindowFullError: (``sbs``) the window is at its request or token bound.
        """
        legs = self.legs
        if legs.prefill is not None and legs.is_pd(request):
            key = legs.choose_prefill(request, now)
            if key is None or not legs.record(request, key, now):
                raise NoServingRankError(request.model)
            return key
        return self._mode.submit(request, now)

    def poll(self, now: float) -> WindowOutcome | None:
        """Close the window if it is due and place its batch; ``None`` when it is not due."""
        return self._mode.poll(now)

    def place_retry(self, request: PendingRequest, failed: set[RankKey], now: float) -> RankKey:
        """Place a request again after it failed on the ranks in ``failed``, at once (it already waited its window).

        The rank is chosen by vLLM's ``waiting * 4 + running`` rule among the usable ranks serving the model,
        preferring engines where it has not failed yet. A P/D request gets a new pair: its prefill rank so, and its
        decode rank by the decode leg's policy, each avoiding the ranks in ``failed``.

        Raises:
            NoServingRankError: no other usable rank serves the model.
        """
        if self.legs.is_pd(request):
            prefill = choose_avoiding(self._retry_policy, request, self.view.snapshot(now, PREFILL_ROLES), failed)
            if prefill is None or not self.legs.record(request, prefill, now, failed):
                raise NoServingRankError(request.model)
            return prefill
        candidates = [r for r in self.view.snapshot(now) if r.key not in failed]
        failed_engines = {k.engine for k in failed}
        elsewhere = [r for r in candidates if r.key.engine not in failed_engines]
        key = self._retry_policy.choose(request, elsewhere) or self._retry_policy.choose(request, candidates)
        if key is None:
            raise NoServingRankError(request.model)
        record_dispatch(self.view, self.prefix, request, key, now)
        return key

    def set_prefill_alignment(self, engine: str, aligned: bool) -> None:
        """Record whether ``engine`` aligns prefill across its DP ranks itself (declared in
        ``engines[].prefill_alignment`` or read from the engine); ``sbs`` then places a request at once when every
        instance serving it does (``window.yield_to_engine_alignment``)."""
        if aligned:
            self._aligned.add(engine)
        else:
            self._aligned.discard(engine)

    def forget_engine(self, engine: str) -> None:
        """``engine`` left the gateway (its ranks already left the load view): drop its prefix-cache blocks, its
        step-time model and its prefill alignment."""
        if self.prefix is not None:
            self.prefix.forget(engine)
        self.step_clock.forget(engine)
        self._aligned.discard(engine)

    @property
    def prefill_aligned_engines(self) -> frozenset[str]:
        """The engines recorded as aligning their own prefill (:meth:`set_prefill_alignment`)."""
        return frozenset(self._aligned)

    def closed_at_once(self) -> dict[str, int]:
        """How many windows ``sbs`` closed as they opened, by reason (``idle``, ``engine_aligned``, ``alone``);
        empty for immediate policies."""
        if not isinstance(self._mode, _Windowed):
            return {}
        return {str(reason): count for reason, count in self._mode.closed_at_once.items()}

    def cancel(self, request_id: str) -> bool:
        """Drop a request still waiting in the window; return whether it was there."""
        request = self.window.remove(request_id)
        if request is not None and self.fairness is not None:
            self.fairness.leave(request.tenant)
        return request is not None

    def next_deadline(self) -> float | None:
        """When :meth:`poll` must next be called even if nothing happens, or ``None``."""
        return self.window.deadline

    def drain_seconds(self) -> dict[RankKey, float]:
        """Every rank's load in seconds of work (:meth:`StepClock.drain_s
        <gateway.scheduling.step_clock.StepClock.drain_s>`), from the load view's queued prompt tokens."""
        out: dict[RankKey, float] = {}
        for engine in self.view.engine_names:
            out |= self.step_clock.drain_s(engine, self.view.queued_prefill_tokens(engine))
        return out

    def step_models(self) -> dict[str, tuple[float, float, float, int]]:
        """Each engine's fitted step-time model: ``(a s, b s/token, c s/token, timed steps observed)``."""
        out = {}
        for engine in self.view.engine_names:
            model = self.step_clock.model(engine)
            out[engine] = (*model.coefficients, model.observations)
        return out

    # -- progress: every driver reports what it sees through these, and nothing else ---------------------

    def on_first_token(self, request_id: str, engine: str, now: float) -> None:
        """The first output token of ``request_id`` came back from ``engine``: its prefill is done, so its rank
        has room again, and the token marks where ``engine`` is in its step."""
        self.view.on_first_token(request_id, now)
        if self.fairness is not None:
            self.fairness.on_tokens(request_id, 1)
        self._track_step(engine, now)
        self.window.notify_capacity_freed()

    def on_tokens(self, request_id: str, engine: str, n: int, now: float) -> bool:
        """``n`` more output tokens of ``request_id`` came back from ``engine``; return whether they began a new
        step of ``engine`` (a step boundary), after which :meth:`poll` should run again: the close of the open
        window may now be due earlier (``step_aligned_close``) and the ranks took in work, so early closing is
        re-armed."""
        self.view.on_tokens(request_id, n)
        if self.fairness is not None:
            self.fairness.on_tokens(request_id, n)
        if self.step_clock.continues_burst(engine, now):
            return False  # decode tokens move no queue: the step clock's figures stand
        new_step = self._track_step(engine, now)
        if new_step:
            self.window.notify_capacity_freed()
        return new_step

    def on_finish(self, request_id: str, now: float) -> None:
        """``request_id`` ended (completed, failed or aborted): its rank has room again, and if that leaves no rank
        of its engine decoding, the engine's step in progress may end without tokens (so it is not timed)."""
        key = self.view.rank_of(request_id)
        self.view.on_finish(request_id, now)
        if self.fairness is not None:
            self.fairness.on_finish(request_id)
        if key is not None:
            self.step_clock.still_timed(key.engine, self.view.decodes_next_step(key.engine))
        self.window.notify_capacity_freed()

    def on_scrape(self, engine: str, ranks: dict[int, RankMetrics], now: float) -> None:
        """A scrape of ``engine`` succeeded with per-rank figures: the load view restarts from them.

        Raises:
            KeyError: ``engine`` is unknown.
        """
        self.view.on_scrape(engine, ranks, now)
        self.window.notify_capacity_freed()

    def on_scrape_failure(self, engine: str, now: float) -> None:
        """A scrape of ``engine`` failed: the view counts it and falls back to local accounting once stale."""
        self.view.on_scrape_failure(engine, now)

    def on_capacity_changed(self) -> None:
        """Some rank may take requests again for a reason the scheduler cannot see (a circuit breaker closed, a
        scrape reported): re-arm early closing."""
        self.window.notify_capacity_freed()

    def _track_step(self, engine: str, now: float) -> bool:
        """Feed the step clock with tokens from ``engine`` at ``now`` (after the load view took them in); return
        whether they began a new step."""
        queued, ranks, budget = self.view.prefill_queue(engine)
        decodes_next = self.view.decodes_next_step(engine)
        return self.step_clock.observe_queue(engine, now, queued, ranks, budget, decodes_next=decodes_next)
