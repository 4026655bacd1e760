"""Virtual-time simulation: the gateway's own scheduler in front of engine models, no HTTP in between.

Deterministic discrete-event simulation. It drives the very code the gateway runs (the
:class:`~gateway.scheduling.scheduler.Scheduler`, its window and allocator, the
:class:`~gateway.load.view.LoadView`) against :class:`~gateway.sim.engine_model.EngineModel` instances, the
same model the HTTP mock engine runs in real time. What the gateway would observe is fed to it the way it
would see it: first tokens, tokens and finishes when a step ends (the step clock infers the step boundaries and
step times from them), and scrapes of each instance's per-rank gauges every ``scrape_interval_s``.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.config import (
    AllocatorConfig,
    DecodeConfig,
    PhaseAwareConfig,
    PolicyName,
    PrefixCacheConfig,
    TenantsConfig,
    WindowConfig,
)
from gateway.load.view import EngineSpec, LoadView
from gateway.scheduling.scheduler import Scheduler
from gateway.sim.calibration import EngineModelConfig
from gateway.sim.engine_model import EngineModel, StepResult, TokenEvent
from gateway.sim.frontdoors import FrontDoorConfig, FrontDoors
from gateway.sim.information import InformationLimits, RequestView, draw_request_views
from gateway.sim.pd_driver import PdDriver, PdPools
from gateway.tokens import PromptTokenCorrection
from gateway.types import PendingRequest, RankKey, RankMetrics
from gateway.workload.stats import distribution
from gateway.workload.traces import TraceRequest

MODEL = "sim"


@dataclass(frozen=True)
class SimConfig:
    """One simulated cluster and policy.

    Attributes:
        policy: scheduling policy.
        instances: engine instances.
        dp_size: DP ranks per instance.
        engine: per-rank timing and capacity.
        window: window settings (``sbs``).
        allocator: allocator settings (``sbs``).
        decode: decode-aware choice settings (``sbs``); ``None`` switches it off.
        prefix_cache: the gateway's prefix index (every policy's placements are recorded in it; ``sbs`` and
            ``phase_aware`` place by it); ``None`` switches it off.
        scrape_interval_s: time between two scrapes of an instance's metrics, seconds.
        scrape_lag_s: how old the figures are when the gateway receives them (engine logging interval plus
            the scrape's own latency), seconds.
        stale_after_s: the load view's staleness bound, seconds.
        state_sync: the load view adds the gateway's own dispatches, first tokens and finishes between
            scrapes (``docs/design.md`` §2.7, "robust state synchronization"); ``False`` makes every policy see each
            engine's ranks as they were at its last scrape, for ablation.
        seed: seed of randomised policies and of the information limits' draws.
        limits: what the gateway does not know, or knows late (estimated prompt tokens, non-streamed requests,
            dispatch latency); the default is the idealised gateway that knows everything at once.
        engine_queued_tokens: each scrape also carries every rank's prompt tokens still to prefill (the waiting
            requests', cache hits off once admitted), as SGLang's ``GET /v1/loads`` reports
            ``num_waiting_uncached_tokens`` and the live gateway reads it (``scrape.engine_queued_tokens``); off by
            default, so existing figures stay as they were.
        pd: P/D disaggregation: prefill and decode pools (:mod:`gateway.sim.pd_driver`) in place of ``instances``
            mixed instances of ``dp_size`` ranks (both then unused); None (the default) simulates mixed instances.
        front_doors: several front doors and how they share their view (:mod:`gateway.sim.frontdoors`; mixed
            instances only); None (the default) simulates one.
        tenants: priority classes and fair sharing between tenants (``sbs``; each trace request's ``tenant`` and
            ``priority``, :mod:`gateway.sim.tenants`); None (the default) places every request alike.
    """

    policy: PolicyName = "sbs"
    instances: int = 2
    dp_size: int = 8
    engine: EngineModelConfig = field(default_factory=EngineModelConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    allocator: AllocatorConfig = field(default_factory=PhaseAwareConfig)
    decode: DecodeConfig | None = field(default_factory=DecodeConfig)
    prefix_cache: PrefixCacheConfig | None = field(default_factory=PrefixCacheConfig)
    scrape_interval_s: float = 0.5
    scrape_lag_s: float = 0.05
    stale_after_s: float = 3.0
    state_sync: bool = True
    seed: int = 0
    limits: InformationLimits = field(default_factory=InformationLimits)
    engine_queued_tokens: bool = False
    pd: PdPools | None = None
    front_doors: FrontDoorConfig | None = None
    tenants: TenantsConfig | None = None


@dataclass(frozen=True)
class Slo:
    """A service-level objective per request: TTFT <= ``ttft_s + ttft_per_unloaded * unloaded TTFT of its
    prompt`` and TPOT <= ``tpot_s`` (a one-token request meets the TPOT objective trivially).

    Attributes:
        ttft_s: fixed TTFT allowance, seconds.
        tpot_s: TPOT objective, seconds.
        ttft_per_unloaded: multiple of the request's own unloaded TTFT (:func:`unloaded_ttft_s`) added to
            ``ttft_s``; 0 gives a flat TTFT objective.
    """

    ttft_s: float = 2.0
    tpot_s: float = 0.1
    ttft_per_unloaded: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """JSON-able form."""
        return {"ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "ttft_per_unloaded": self.ttft_per_unloaded}


def unloaded_ttft_s(prompt_tokens: int, engine: EngineModelConfig) -> float:
    """Time to first token of a prompt alone on an idle instance: its chunked-prefill steps (each with the
    instance's all-to-all), seconds."""
    total, done = 0.0, 0
    while done < prompt_tokens:
        chunk = min(engine.max_prefill_tokens_per_step, prompt_tokens - done)
        total += engine.alltoall_s + engine.prefill_chunk_s(chunk, done)
        done += chunk
    return total


SLO_SCALE = 3.0
"""Default ``scale`` of :func:`derived_slo`. DistServe (Zhong et al., OSDI 2024) sets SLOs as a multiple ("SLO
scale") of a request's latency on an unloaded system; we take 3, the middle of the scales it sweeps."""


def derived_slo(trace: list[TraceRequest], engine: EngineModelConfig, scale: float = SLO_SCALE) -> Slo:
    """An SLO for ``trace`` on mixed (prefill + decode) engines, from the engine model alone.

    - TTFT: the duration of one step whose heaviest rank prefills a full chunked-prefill budget (a prefill
      step is non-preemptive, so any request may have to wait out one, ``docs/design.md`` §1), plus ``scale`` times
      the request's own unloaded TTFT (a 90k-token prompt cannot start in 2 s).
    - TPOT: ``scale`` times the step of a decode batch that shares its step with one prefill of the trace's
      mean prompt length (up to one budget): on a mixed engine every decode token waits for the prefill work
      of requests arriving meanwhile, which a flat 100 ms ignores (a single 8k-token chunk takes 1.2 s).

    Raises:
        ValueError: empty trace or ``scale <= 0``.
    """
    if not trace or scale <= 0:
        raise ValueError("need a non-empty trace and scale > 0")
    budget = engine.max_prefill_tokens_per_step
    full_step = engine.alltoall_s + engine.prefill_chunk_s(budget, 0)
    mean_prompt = sum(r.prompt_tokens for r in trace) / len(trace)
    shared_step = engine.alltoall_s + engine.prefill_chunk_s(min(round(mean_prompt), budget), 0)
    return Slo(ttft_s=full_step, tpot_s=scale * shared_step, ttft_per_unloaded=scale)


@dataclass(slots=True)
class _Record:
    arrival_s: float
    output_tokens: int
    unloaded_ttft_s: float = 0.0
    sent_s: float | None = None
    """When the request left the gateway for its rank (the end of its window wait)."""
    first_token_s: float | None = None
    done_s: float | None = None
    prefill_answer_s: float | None = None
    """P/D: when the prefill leg's answer reached the gateway."""

    @property
    def ttft_s(self) -> float:
        assert self.first_token_s is not None
        return self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float:
        assert self.done_s is not None
        return self.done_s - self.arrival_s

    @property
    def tpot_s(self) -> float:
        assert self.done_s is not None and self.first_token_s is not None
        return (self.done_s - self.first_token_s) / max(1, self.output_tokens - 1)


@dataclass
class SimResult:
    """Per-request times and per-step figures of one simulation."""

    records: list[_Record]
    step_imbalance: list[float]
    """Per prefill-carrying step: max over ranks of work over the mean (1.0 = perfectly balanced)."""
    sim_end_s: float
    prefix_cache_hit_rate: float | None = None
    """Prompt tokens found in the ranks' prefix caches over prompt tokens looked up, fraction 0-1 (vLLM's
    ``prefix_cache_hits / prefix_cache_queries`` summed over ranks); None when the engines have no prefix cache."""

    def met(self, slo: Slo) -> int:
        """How many requests completed within both of ``slo``'s objectives."""
        return sum(
            1
            for r in self.records
            if r.done_s is not None
            and r.first_token_s is not None
            and r.ttft_s <= slo.ttft_s + slo.ttft_per_unloaded * r.unloaded_ttft_s
            and (r.output_tokens <= 1 or r.tpot_s <= slo.tpot_s)
        )

    def span_s(self) -> float:
        """First arrival to last completion, seconds (0 when nothing completed): what goodput divides by."""
        done = [r.done_s for r in self.records if r.done_s is not None and r.first_token_s is not None]
        return max(done) - self.records[0].arrival_s if done else 0.0

    def goodput(self, slo: Slo) -> dict[str, float]:
        """``{"slo_attainment", "goodput_rps"}`` under ``slo``: the fraction of all requests that met both
        objectives, and those requests per second of :meth:`span_s` (the figures :meth:`summary` gives for its
        one SLO)."""
        good, span = self.met(slo), self.span_s()
        return {
            "slo_attainment": good / len(self.records) if self.records else 0.0,
            "goodput_rps": good / span if span > 0 else 0.0,
        }

    def summary(self, slo: Slo | None = None) -> dict[str, Any]:
        """Figures in the shape ``gateway bench`` writes (``ttft_s``, ``tpot_s``, ``e2e_s``, throughput), plus
        SLO attainment and goodput.

        Args:
            slo: the objective; default TTFT <= 2 s and TPOT <= 100 ms for every request.

        Returns:
            A JSON-able dict; ``slo_attainment`` is the fraction of all requests that met both objectives and
            ``goodput_rps`` those requests per second of the run.
        """
        slo = slo or Slo()
        done = [r for r in self.records if r.done_s is not None and r.first_token_s is not None]
        ttft = [r.ttft_s for r in done]
        e2e = [r.e2e_s for r in done]
        tpot = [r.tpot_s for r in done if r.output_tokens > 1]
        span = (max(r.e2e_s + r.arrival_s for r in done) - self.records[0].arrival_s) if done else 0.0
        out_tokens = sum(r.output_tokens for r in done)
        good = self.met(slo)
        return {
            "completed": len(done),
            "failed": len(self.records) - len(done),
            "ttft_s": distribution(ttft),
            "tpot_s": distribution(tpot),
            "e2e_s": distribution(e2e),
            "output_throughput_tok_s": out_tokens / span if span > 0 else 0.0,
            "slo": slo.as_dict(),
            "slo_attainment": good / len(self.records) if self.records else 0.0,
            "goodput_rps": good / span if span > 0 else 0.0,
            "step_imbalance": distribution(self.step_imbalance),
        } | ({} if self.prefix_cache_hit_rate is None else {"prefix_cache_hit_rate": self.prefix_cache_hit_rate})


def _arrival_order(item: tuple[float, int, TokenEvent, str]) -> tuple[float, int]:
    return item[0], item[1]


@dataclass(slots=True)
class _TokenRun:
    """The tokens one delivery sent on to the gateway with a delay, as ``(arrival time, sequence number, token,
    engine)`` in arrival order, and the index of the next to arrive."""

    items: list[tuple[float, int, TokenEvent, str]]
    next: int = 0


class _Sim:
    def __init__(
        self, trace: list[TraceRequest], config: SimConfig, on_done: Callable[[int], None] | None = None
    ) -> None:
        self.on_done = on_done
        self.config = config
        self.trace = trace
        budget = config.engine.max_prefill_tokens_per_step
        self.pd: PdDriver | None = None
        if config.pd is not None:
            self.pd = PdDriver(config.pd, config.engine, self)
            self.engines = self.pd.engines
            specs = self.pd.specs(frozenset({MODEL}), budget)
        else:
            names = [f"i{n}" for n in range(config.instances)]
            self.engines = {n: EngineModel(config.engine, config.dp_size) for n in names}
            specs = [EngineSpec(n, config.dp_size, frozenset({MODEL}), budget) for n in names]

        def make_scheduler(door: int = 0) -> Scheduler:
            view = LoadView(specs, stale_after_s=config.stale_after_s, state_sync=config.state_sync)
            return Scheduler(
                config.policy,
                view,
                window=config.window,
                allocator=config.allocator,
                decode=config.decode,
                prefix_cache=config.prefix_cache,
                seed=config.seed + door,
                pd=None if config.pd is None else config.pd.pd_config(),
                tenants=config.tenants,
            )

        self.scheduler: Scheduler | FrontDoors
        if config.front_doors is None:
            self.scheduler = make_scheduler()
        elif config.pd is not None:
            raise ValueError("front doors are simulated on mixed instances only, not with P/D pools")
        else:
            self.scheduler = FrontDoors(
                config.front_doors,
                make_scheduler,
                self.read_ranks,
                list(self.engines),
                config.scrape_interval_s,
                config.scrape_lag_s,
                config.seed,
            )
        if config.engine.enable_prefill_delayer or config.engine.prefill_schedule_interval > 1:
            # what the gateway reads from SGLang's /get_server_info, or an operator declares for vLLM
            for name in self.engines:
                self.scheduler.set_prefill_alignment(name, True)
        self.busy: dict[str, StepResult | None] = {n: None for n in self.engines}
        extra = self.pd.unloaded_extra_s if self.pd is not None else (lambda _: 0.0)
        self.records = [
            _Record(
                r.arrival_s,
                r.output_tokens,
                unloaded_ttft_s(r.prompt_tokens, config.engine) + extra(r.prompt_tokens),
            )
            for r in trace
        ]
        self.completed = 0
        """Requests finished so far."""
        self.imbalance: list[float] = []
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = itertools.count()
        self.poll_at: float | None = None
        self.now = 0.0
        self.views: list[RequestView] | None = None
        if config.limits != InformationLimits():
            self.views = draw_request_views([r.prompt_tokens for r in trace], config.limits, config.seed)
        self.correction = PromptTokenCorrection() if config.limits.online_correction else None
        self.raw_estimates: dict[int, int] = {}
        """The uncorrected estimate of each request in flight, while the correction learns."""
        self.scraped: dict[str, dict[int, RankMetrics]] = {}
        """Each engine's last scraped figures per rank: a rank whose gauges did not move since is scraped as the same
        (immutable) object, which the load view recognises at once."""

    def push(self, t: float, kind: str, data: Any = None) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, data))

    def run(self) -> SimResult:
        for i, r in enumerate(self.trace):
            self.push(r.arrival_s, "arrival", i)
        for n in self.engines:
            self.push(0.0, "scrape", n)
        while self.events and self.completed < len(self.trace):
            self.now, _, kind, data = heapq.heappop(self.events)
            if kind == "tokens":
                self.tokens_arrive(data)
                continue
            before = self.completed
            if kind == "arrival":
                self.on_arrival(data)
            elif kind == "step_end":
                self.on_step_end(data)
            elif kind == "pd":
                assert self.pd is not None
                self.pd.handle(*data)
            elif kind == "engine_arrival":
                self.engine_arrival(*data)
            elif kind == "scrape":
                self.on_scrape(data)
            elif kind == "scrape_result":
                self.on_scrape_result(*data)
            elif kind == "poll" and self.poll_at == self.now:
                self.poll_at = None
            self.poll()
            if self.completed > before and self.on_done is not None:
                self.on_done(self.completed - before)
        hit_rate = None
        if self.config.engine.enable_prefix_caching:
            stats = [s for engine in self.engines.values() for s in engine.rank_stats()]
            queries = sum(s.prefix_cache_queries for s in stats)
            hit_rate = sum(s.prefix_cache_hits for s in stats) / queries if queries else 0.0
        return SimResult(self.records, self.imbalance, self.now, hit_rate)

    def on_arrival(self, index: int) -> None:
        r = self.trace[index]
        request = PendingRequest(
            str(index),
            MODEL,
            r.prompt_tokens,
            r.output_tokens,
            self.now,
            prefix_blocks=r.hash_ids,
            tenant=r.tenant,
            priority=r.priority,
        )
        if self.views is not None:
            view = self.views[index]
            prompt_tokens = view.prompt_tokens
            if self.correction is not None:
                self.raw_estimates[index] = prompt_tokens
                prompt_tokens = self.correction.correct(prompt_tokens)
            request = PendingRequest(
                str(index),
                MODEL,
                prompt_tokens,
                r.output_tokens,
                self.now,
                view.stream,
                prefix_blocks=r.hash_ids,
                tenant=r.tenant,
                priority=r.priority,
            )
        key = self.scheduler.submit(request, self.now)
        if key is not None:
            self.send(index, key)
            self.kick()

    def send(self, index: int, key: RankKey) -> None:
        r = self.trace[index]
        self.records[index].sent_s = self.now
        if self.pd is not None:
            assert isinstance(self.scheduler, Scheduler), "P/D runs one front door"
            decode = self.scheduler.view.decode_rank_of(str(index))
            assert decode is not None, "a P/D placement records its decode rank"
            view = None if self.views is None else self.views[index]
            self.pd.send(
                str(index),
                key,
                decode,
                r.prompt_tokens,
                r.output_tokens,
                r.hash_ids,
                0.0 if view is None else view.to_engine_s,
                0.0 if view is None else view.to_gateway_s,
            )
            return
        if self.views is not None and self.views[index].to_engine_s > 0:
            self.push(self.now + self.views[index].to_engine_s, "engine_arrival", (index, key))
            return
        self.engines[key.engine].add_request(
            str(index), key.rank, r.prompt_tokens, r.output_tokens, prefix_blocks=r.hash_ids
        )

    def kick(self) -> None:
        """Idle instances with work start a step (after a whole batch has been handed over)."""
        for name, result in self.busy.items():
            if result is None:
                self.start_step(name)

    def is_idle(self, name: str) -> bool:
        """Whether engine ``name`` runs no step now."""
        return self.busy[name] is None

    def start_step(self, name: str) -> None:
        if self.pd is not None:
            self.pd.before_step(name)
            result = self.engines[name].step(self.now)
        else:
            result = self.engines[name].step()
        if result.duration_s <= 0:
            self.busy[name] = None
            if self.pd is not None:
                self.pd.after_idle(name)
            return
        self.busy[name] = result
        self.push(self.now + result.duration_s, "step_end", name)
        if any(result.prefill_tokens_per_rank):
            work = result.work_s_per_rank
            mean = sum(work) / len(work)
            if mean > 0:
                self.imbalance.append(max(work) / mean)

    def on_step_end(self, name: str) -> None:
        result = self.busy[name]
        assert result is not None
        self.busy[name] = None
        if self.pd is not None and self.pd.is_prefill(name):
            self.pd.prefill_tokens(result.tokens)
        else:
            self.deliver(result.tokens, name)
        if self.busy[name] is None:
            self.start_step(name)

    def deliver(self, events: list[TokenEvent], name: str) -> None:
        """Tokens ``events`` leave engine ``name`` now for the gateway (at once, or after their delay)."""
        views = self.views
        delayed: list[tuple[float, int, TokenEvent, str]] = []
        for event in events:
            if views is not None:
                delay = views[int(event.request_id)].to_gateway_s
                if delay > 0:
                    delayed.append((self.now + delay, next(self.seq), event, name))
                    continue
            self.progress(event, name)
        if delayed:
            delayed.sort(key=_arrival_order)
            first = delayed[0]
            heapq.heappush(self.events, (first[0], first[1], "tokens", _TokenRun(delayed)))

    def tokens_arrive(self, run: _TokenRun) -> None:
        """The next token of ``run`` reaches the gateway now, and so do the run's later ones for as long as each would
        be the next event anyway (the run stands in the event queue for its next token, under the sequence number
        :meth:`deliver` drew for it, so the events' order is the one a queue entry per token would give); each is
        followed by what every event is (:meth:`poll`, ``on_done``)."""
        items, total, events = run.items, len(self.trace), self.events
        i = run.next
        while True:
            before = self.completed
            self.progress(items[i][2], items[i][3])
            self.poll()
            if self.completed > before and self.on_done is not None:
                self.on_done(self.completed - before)
            i += 1
            if i == len(items) or self.completed >= total:
                return
            t, seq = items[i][0], items[i][1]
            if events and (events[0][0] < t or (events[0][0] == t and events[0][1] < seq)):
                run.next = i
                heapq.heappush(events, (t, seq, "tokens", run))
                return
            self.now = t

    def on_prefill_answer(self, request_id: str, name: str) -> None:
        """The prefill leg of P/D request ``request_id`` answered from prefill engine ``name``: the relay tells the
        dispatcher, as a first token from that engine."""
        self.records[int(request_id)].prefill_answer_s = self.now
        self.scheduler.on_first_token(request_id, name, self.now)

    def progress(self, event: TokenEvent, name: str) -> None:
        """A token reaches the gateway: the client's record and the scheduler's progress protocol (no first token
        or tokens of a non-streamed request, only its finish)."""
        index = int(event.request_id)
        record = self.records[index]
        streamed = self.views is None or self.views[index].stream
        if event.index == 0:
            record.first_token_s = self.now
            if streamed:
                self.scheduler.on_first_token(event.request_id, name, self.now)
        elif streamed:
            self.scheduler.on_tokens(event.request_id, name, 1, self.now)
        if event.finished:
            record.done_s = self.now
            self.completed += 1
            self.scheduler.on_finish(event.request_id, self.now)
            if self.pd is not None:
                self.pd.finished(event.request_id)
            if self.correction is not None:  # the engine's usage.prompt_tokens arrives with the finish
                self.correction.observe(self.raw_estimates.pop(index), self.trace[index].prompt_tokens)

    def engine_arrival(self, index: int, key: RankKey) -> None:
        """A request placed ``to_engine_s`` ago reaches its engine, which starts a step if it is idle."""
        r = self.trace[index]
        self.engines[key.engine].add_request(
            str(index), key.rank, r.prompt_tokens, r.output_tokens, prefix_blocks=r.hash_ids
        )
        self.kick()

    def on_scrape(self, name: str) -> None:
        """The engine's gauges are read now and reach the gateway ``scrape_lag_s`` later."""
        queued = self.config.engine_queued_tokens
        if self.pd is not None:
            stats = self.engines[name].rank_stats()
            pd_ranks = self.pd.rank_metrics(name, stats, self.now, queued)
            self.push(self.now + self.config.scrape_lag_s, "scrape_result", (name, pd_ranks))
            self.push(self.now + self.config.scrape_interval_s, "scrape", name)
            return
        self.push(self.now + self.config.scrape_lag_s, "scrape_result", (name, self.read_ranks(name)))
        self.push(self.now + self.config.scrape_interval_s, "scrape", name)

    def read_ranks(self, name: str) -> dict[int, RankMetrics]:
        """Mixed engine ``name``'s per-rank gauges as a scrape reads them now (a rank's :class:`RankMetrics` is the
        one read last time while its gauges are unchanged)."""
        if self.config.engine_queued_tokens:
            return {
                s.rank: RankMetrics(
                    s.running,
                    s.waiting,
                    s.kv_usage,
                    queued_prefill_tokens=s.waiting_prompt_tokens,
                    queued_read_at=self.now,
                )
                for s in self.engines[name].rank_stats()
            }
        last = self.scraped.setdefault(name, {})
        ranks = {}
        for rank, gauges in enumerate(self.engines[name].rank_gauges()):
            m = last.get(rank)
            if m is None or (m.running, m.waiting, m.kv_usage) != gauges:
                m = last[rank] = RankMetrics(*gauges)
            ranks[rank] = m
        return ranks

    def on_scrape_result(self, name: str, ranks: dict[int, RankMetrics]) -> None:
        self.scheduler.on_scrape(name, ranks, self.now)

    def poll(self) -> None:
        if isinstance(self.scheduler, Scheduler) and not len(self.scheduler.window):
            return  # nothing buffered: the scheduler's poll places nothing, and there is no deadline
        outcome = self.scheduler.poll(self.now)
        if outcome is not None:
            for request, key in outcome.assigned:
                self.send(int(request.request_id), key)
            self.kick()
        deadline = self.scheduler.next_deadline()
        if deadline is not None and (self.poll_at is None or deadline < self.poll_at):
            self.poll_at = max(deadline, self.now)
            self.push(self.poll_at, "poll")


def simulate(trace: list[TraceRequest], config: SimConfig, on_done: Callable[[int], None] | None = None) -> SimResult:
    """Run ``trace`` (arrivals in seconds from 0) through one policy on a simulated cluster, to completion.

    ``on_done(n)`` is called each time ``n`` requests complete (a progress bar's hook)."""
    return _Sim(trace, config, on_done).run()
