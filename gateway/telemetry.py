"""The gateway's own Prometheus metrics, in a registry owned by one app instance (no globals).

Series (all prefixed ``gateway_``):

- ``requests_total{route, model, status}``: answered requests (``model`` is ``unknown`` for unserved names,
  to bound label cardinality).
- ``ttft_seconds{model}``, ``e2e_latency_seconds{model}``: time to first token and end-to-end latency measured
  at the gateway, from request arrival.
- ``window_wait_seconds``, ``window_batch_size``: time requests spent buffered in the staggered window, and
  requests placed per closed window; ``window_interval_seconds``, ``window_buffered_requests`` gauges.
- ``window_closed_at_once_total{reason}`` (``idle``|``engine_aligned``|``alone``): windows closed as they
  opened, because holding could not help (:func:`gateway.scheduling.step_aligned_close.close_at_once_reason`);
  ``engine_prefill_aligned{engine}``: 1 while the gateway counts the engine as aligning its own prefill.
- ``dispatched_requests_total{engine, rank}``, ``dispatched_prompt_tokens_total{engine, rank}``.
- ``scrapes_total{engine, result}`` (``ok``|``error``), ``scrape_errors_total{engine}``.
- ``rank_running``, ``rank_waiting``, ``rank_queued_prefill_tokens``, ``rank_kv_usage`` ``{engine, rank}``: the
  load view as the allocator sees it, read at scrape time; ``rank_drain_seconds{engine, rank}``: the same queue in
  seconds of work, by the engine's fitted step-time model (:meth:`gateway.scheduling.step_clock.StepClock.drain_s`);
  ``rank_decode_queue_requests{engine, rank, queue}`` (``prealloc``|``transfer``): of a P/D decode rank's running
  requests, those waiting for their KV to be reserved and those receiving it, as the engine last reported them plus
  the gateway's decode legs sent since (:attr:`gateway.types.RankLoad.decode_prealloc`; 0 on other ranks and
  without fresh figures); ``rank_kv_tokens{engine, rank}``: KV tokens held by the rank's requests as the allocator
  sees them (a decode rank's reconciled with the engine's figure, :mod:`gateway.load.view`).
- ``step_model_seconds{engine, term}`` (``a``: seconds per step; ``b``, ``c``: seconds per prefill token of the
  heaviest rank and of the ranks' mean) and ``step_model_timed_steps{engine}``: each engine's step-time model as
  fitted so far (:class:`gateway.scheduling.step_clock.StepTimeModel`).
- ``inflight_requests``: requests dispatched and not finished.
- ``engine_up{engine}``: 1 while the engine's circuit breaker lets traffic through, 0 while it is open.
- ``engine_info{engine, flavor, role}``: 1 per configured engine, naming its flavour and its P/D role
  (``mixed``|``prefill``|``decode``); per-engine and per-rank series join it on ``engine`` (and the scraped
  ``instance``, one per gateway replica) to be read by role, e.g. the decode ranks' KV usage:
  ``gateway_rank_kv_usage * on (instance, engine) group_left (role) gateway_engine_info{role="decode"}``.
- ``health_checks_total{engine, result}`` (``ok``|``error``): active ``/health`` probes.
- ``upstream_failures_total{engine, kind}`` (``unavailable``|``timeout``|``http_5xx``|``stream_broken``).
- ``upstream_retries_total{engine}``: requests sent again to another rank after a failure before any byte
  reached the client (``engine`` is the one that failed).
- ``pd_leg_failures_total{engine, leg, kind}``: failed legs of P/D requests (``leg`` ``prefill``|``decode``;
  ``kind`` as ``upstream_failures_total``'s, or ``protocol`` for a prefill answer the decode leg cannot use, or
  ``late`` for a prefill leg that failed after the decode leg's answer had begun; a decode leg whose stream breaks
  after its first byte counts too); each failed leg cancels the other at once (:mod:`gateway.server.pd_relay`).
- ``pd_transfers_total{protocol, outcome}``: attempts of P/D requests by protocol (``sglang``|``nixl``|``mooncake``)
  and outcome: ``ok`` (the decode leg's answer began), ``prefill_failed``, ``decode_failed``, ``rejected`` (an
  engine answered 4xx, passed on to the client), ``cancelled`` (the client went away), or ``whole`` (vLLM ``n >
  1``: no split, the request ran whole on the decode rank).
- ``retries_throttled_total``: failed tries not retried because retry throttling was engaged.
- ``rejected_requests_total{reason}`` (``window_full``|``queue_deadline``|``draining``|``no_healthy_engine``):
  requests turned away with 429/503 before reaching an engine.
- ``draining``: 1 once shutdown has begun.
- ``engine_changes_total{change, source}``: changes to the engine set at runtime (``change``
  ``added``|``drained``|``undrained``|``removed``; ``source`` ``admin`` (the admin API), ``reload`` (the
  configuration file, on SIGHUP) or ``discovery``); ``engine_draining{engine}``: 1 while the engine takes no new
  requests and finishes those in flight (:mod:`gateway.engine_set`); ``config_reloads_total{result}``
  (``applied``|``refused``). A removed engine's per-engine series are no longer exported.
- ``prompt_tokens_estimate_ratio{model}``: the prompt tokens an engine reported (``usage.prompt_tokens``)
  divided by the gateway's estimate for the same request (1 is exact, 2 an estimate half the truth).
- ``prompt_token_correction{model}``: the factor the online correction scales each prompt-token estimate by
  (:class:`gateway.tokens.PromptTokenCorrection`; 1 until the engines report counts), and
  ``prompt_token_estimate_error{model}``, the exponentially weighted mean of ``|ln(reported / estimated)|`` over
  the requests the engines reported on (0.1 is about 10% off); ``prompt_token_observations_total{model}``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Set

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from gateway.tokens import PromptTokenCorrection
from gateway.types import RankKey, RankLoad

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300, 600)
"""Seconds; reach to 10 minutes because slowed simulated engines and long generations are normal."""
WINDOW_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
ESTIMATE_RATIO_BUCKETS = (0.25, 0.35, 0.5, 0.71, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 1.41, 2.0, 2.83, 4.0)
"""Reported/estimated prompt tokens: factors of sqrt(2) from 1/4 to 4, finer within 25% of exact."""


class _LoadCollector(Collector):
    def __init__(
        self,
        snapshot: Callable[[], Sequence[RankLoad]],
        drain: Callable[[], Mapping[RankKey, float]] | None,
        models: Callable[[], Mapping[str, tuple[float, float, float, int]]] | None,
    ) -> None:
        self._snapshot = snapshot
        self._drain = drain
        self._models = models

    def collect(self) -> Iterator[Metric]:
        fams = {
            "running": GaugeMetricFamily(
                "gateway_rank_running", "Running requests per rank (load view)", labels=["engine", "rank"]
            ),
            "waiting": GaugeMetricFamily(
                "gateway_rank_waiting", "Waiting requests per rank (load view)", labels=["engine", "rank"]
            ),
            "queued_prefill_tokens": GaugeMetricFamily(
                "gateway_rank_queued_prefill_tokens",
                "Prompt tokens sent and not yet prefilled, per rank",
                labels=["engine", "rank"],
            ),
            "kv_usage": GaugeMetricFamily(
                "gateway_rank_kv_usage",
                "KV cache usage reported by the engine (0-1)",
                labels=["engine", "rank"],
            ),
            "kv_tokens": GaugeMetricFamily(
                "gateway_rank_kv_tokens",
                "KV cache tokens held by the rank's requests (load view)",
                labels=["engine", "rank"],
            ),
            "decode_queue": GaugeMetricFamily(
                "gateway_rank_decode_queue_requests",
                "P/D decode rank requests waiting for their KV to be reserved (prealloc) or receiving it (transfer)",
                labels=["engine", "rank", "queue"],
            ),
        }
        for load in self._snapshot():
            labels = [load.key.engine, str(load.key.rank)]
            fams["running"].add_metric(labels, load.running)
            fams["waiting"].add_metric(labels, load.waiting)
            fams["queued_prefill_tokens"].add_metric(labels, load.queued_prefill_tokens)
            if load.kv_usage is not None:
                fams["kv_usage"].add_metric(labels, load.kv_usage)
            fams["kv_tokens"].add_metric(labels, load.kv_tokens)
            fams["decode_queue"].add_metric([*labels, "prealloc"], load.decode_prealloc)
            fams["decode_queue"].add_metric([*labels, "transfer"], load.decode_transfer)
        yield from fams.values()
        if self._drain is not None:
            drain = GaugeMetricFamily(
                "gateway_rank_drain_seconds",
                "Predicted seconds for the rank to prefill its queued prompt tokens (fitted step-time model)",
                labels=["engine", "rank"],
            )
            for key, seconds in self._drain().items():
                drain.add_metric([key.engine, str(key.rank)], seconds)
            yield drain
        if self._models is not None:
            terms = GaugeMetricFamily(
                "gateway_step_model_seconds",
                "Fitted step-time model: a (s per step), b and c (s per prefill token: heaviest rank, mean)",
                labels=["engine", "term"],
            )
            timed = GaugeMetricFamily(
                "gateway_step_model_timed_steps", "Steps the step-time model was fitted on", labels=["engine"]
            )
            for engine, (a, b, c, n) in self._models().items():
                for term, value in (("a", a), ("b", b), ("c", c)):
                    terms.add_metric([engine, term], value)
                timed.add_metric([engine], n)
            yield terms
            yield timed


class _WindowCollector(Collector):
    def __init__(
        self,
        closed: Callable[[], Mapping[str, int]],
        aligned: Callable[[], Set[str]],
        engines: Callable[[], Sequence[str]],
    ) -> None:
        self._closed = closed
        self._aligned = aligned
        self._engines = engines

    def collect(self) -> Iterator[Metric]:
        closed = CounterMetricFamily(
            "gateway_window_closed_at_once",
            "Windows closed as they opened because holding could not help, by reason",
            labels=["reason"],
        )
        for reason, count in sorted(self._closed().items()):
            closed.add_metric([reason], count)
        aligned_now = self._aligned()
        aligned = GaugeMetricFamily(
            "gateway_engine_prefill_aligned",
            "1 while the gateway counts the engine as aligning prefill across its DP ranks itself",
            labels=["engine"],
        )
        for engine in self._engines():
            aligned.add_metric([engine], 1 if engine in aligned_now else 0)
        yield closed
        yield aligned


class _PromptTokenCollector(Collector):
    def __init__(self, corrections: Callable[[], Mapping[str, PromptTokenCorrection]]) -> None:
        self._corrections = corrections

    def collect(self) -> Iterator[Metric]:
        factor = GaugeMetricFamily(
            "gateway_prompt_token_correction",
            "Factor the online correction scales prompt-token estimates by, per model",
            labels=["model"],
        )
        error = GaugeMetricFamily(
            "gateway_prompt_token_estimate_error",
            "EW mean of |ln(reported / estimated)| prompt tokens, per model",
            labels=["model"],
        )
        observed = CounterMetricFamily(
            "gateway_prompt_token_observations",
            "Engine-reported prompt-token counts the correction learnt from, per model",
            labels=["model"],
        )
        for model, correction in sorted(self._corrections().items()):
            factor.add_metric([model], correction.factor)
            error.add_metric([model], correction.abs_log_error)
            observed.add_metric([model], correction.observations)
        yield from (factor, error, observed)


class GatewayMetrics:
    """All metrics of one gateway instance, in its own :class:`CollectorRegistry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("gateway_requests", "Answered requests", ["route", "model", "status"], registry=r)
        self.ttft = Histogram(
            "gateway_ttft_seconds",
            "Time to first token at the gateway",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "gateway_e2e_latency_seconds",
            "End-to-end latency at the gateway",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.window_wait = Histogram(
            "gateway_window_wait_seconds",
            "Time a request spent in the window",
            buckets=WINDOW_BUCKETS,
            registry=r,
        )
        self.window_batch = Histogram(
            "gateway_window_batch_size",
            "Requests placed per closed window",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.window_interval = Gauge("gateway_window_interval_seconds", "Current window interval", registry=r)
        self.window_buffered = Gauge("gateway_window_buffered_requests", "Requests buffered in the window", registry=r)
        self.dispatched = Counter(
            "gateway_dispatched_requests",
            "Requests dispatched per engine and rank",
            ["engine", "rank"],
            registry=r,
        )
        self.dispatched_tokens = Counter(
            "gateway_dispatched_prompt_tokens",
            "Estimated prompt tokens dispatched per engine and rank",
            ["engine", "rank"],
            registry=r,
        )
        self.scrapes = Counter("gateway_scrapes", "Engine metric scrapes", ["engine", "result"], registry=r)
        self.scrape_errors = Counter("gateway_scrape_errors", "Failed engine metric scrapes", ["engine"], registry=r)
        self.inflight = Gauge("gateway_inflight_requests", "Requests dispatched and not finished", registry=r)
        self.engine_up = Gauge(
            "gateway_engine_up", "1 while the engine's circuit breaker lets traffic through", ["engine"], registry=r
        )
        self.engine_info = Gauge(
            "gateway_engine_info",
            "1 per configured engine, labelled with its flavour and P/D role",
            ["engine", "flavor", "role"],
            registry=r,
        )
        self.health_checks = Counter(
            "gateway_health_checks", "Active engine health probes", ["engine", "result"], registry=r
        )
        self.upstream_failures = Counter(
            "gateway_upstream_failures", "Failed engine requests by kind", ["engine", "kind"], registry=r
        )
        self.upstream_retries = Counter(
            "gateway_upstream_retries", "Requests retried elsewhere after this engine failed", ["engine"], registry=r
        )
        self.pd_leg_failures = Counter(
            "gateway_pd_leg_failures", "Failed legs of P/D requests", ["engine", "leg", "kind"], registry=r
        )
        self.pd_transfers = Counter(
            "gateway_pd_transfers", "Attempts of P/D requests by outcome", ["protocol", "outcome"], registry=r
        )
        self.retries_throttled = Counter(
            "gateway_retries_throttled", "Failed tries not retried because retry throttling was engaged", registry=r
        )
        self.rejected = Counter(
            "gateway_rejected_requests", "Requests turned away before reaching an engine", ["reason"], registry=r
        )
        self.draining = Gauge("gateway_draining", "1 once graceful shutdown has begun", registry=r)
        self.prompt_tokens_ratio = Histogram(
            "gateway_prompt_tokens_estimate_ratio",
            "Prompt tokens the engine reported divided by the gateway's estimate",
            ["model"],
            buckets=ESTIMATE_RATIO_BUCKETS,
            registry=r,
        )
        self.class_ttft = Histogram(
            "gateway_class_ttft_seconds",
            "Time to first token at the gateway per priority class (tenants configured)",
            ["priority"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rate_limited = Counter(
            "gateway_rate_limited",
            "Requests refused with 429 by a tenant's rate limit",
            ["tenant", "limit"],
            registry=r,
        )
        self.engine_changes = Counter(
            "gateway_engine_changes",
            "Changes to the engine set at runtime, by change and source",
            ["change", "source"],
            registry=r,
        )
        self.engine_draining = Gauge(
            "gateway_engine_draining",
            "1 while the engine takes no new requests and finishes those in flight",
            ["engine"],
            registry=r,
        )
        self.config_reloads = Counter(
            "gateway_config_reloads", "Configuration file reloads (SIGHUP), by result", ["result"], registry=r
        )
        self._request_counters: dict[tuple[str, str, str], Counter] = {}
        self._latency_children: dict[str, tuple[Histogram, Histogram]] = {}

    def count_request(self, route: str, model: str, status: str) -> None:
        """Count an answered request in ``gateway_requests_total`` (the labelled child is looked up once)."""
        labels = (route, model, status)
        child = self._request_counters.get(labels)
        if child is None:
            child = self._request_counters[labels] = self.requests.labels(*labels)
        child.inc()

    def observe_latency(self, model: str, ttft_s: float | None, e2e_s: float | None) -> None:
        """Observe a request's time to first token and end-to-end latency, seconds, each when not ``None``."""
        children = self._latency_children.get(model)
        if children is None:
            children = self._latency_children[model] = (self.ttft.labels(model), self.e2e.labels(model))
        if ttft_s is not None:
            children[0].observe(ttft_s)
        if e2e_s is not None:
            children[1].observe(e2e_s)

    def describe_engines(self, engines: Iterable[tuple[str, str, str]]) -> None:
        """Export ``gateway_engine_info`` for ``engines``, each ``(name, flavor, role)``."""
        for name, flavor, role in engines:
            self.engine_info.labels(name, flavor, role).set(1)

    def forget_engine(self, name: str) -> None:
        """Stop exporting every series labelled with engine ``name`` (it left the gateway)."""
        for family in (
            self.dispatched,
            self.dispatched_tokens,
            self.scrapes,
            self.scrape_errors,
            self.engine_up,
            self.engine_info,
            self.health_checks,
            self.upstream_failures,
            self.upstream_retries,
            self.pd_leg_failures,
            self.engine_draining,
        ):
            family.remove_by_labels({"engine": name})

    def watch_load(
        self,
        snapshot: Callable[[], Sequence[RankLoad]],
        drain: Callable[[], Mapping[RankKey, float]] | None = None,
        models: Callable[[], Mapping[str, tuple[float, float, float, int]]] | None = None,
    ) -> None:
        """Export the load view: ``snapshot`` (and ``drain``, the ranks' load in seconds, and ``models``, the engines'
        fitted step-time models, when given) are called at each scrape of ``/metrics``."""
        self.registry.register(_LoadCollector(snapshot, drain, models))

    def watch_window(
        self,
        closed_at_once: Callable[[], Mapping[str, int]],
        aligned: Callable[[], Set[str]],
        engines: Callable[[], Sequence[str]],
    ) -> None:
        """Export the window's closes at once (``closed_at_once``: reason → count) and which of the ``engines()``
        align their own prefill (``aligned``), read at each scrape of ``/metrics``."""
        self.registry.register(_WindowCollector(closed_at_once, aligned, engines))

    def watch_prompt_tokens(self, corrections: Callable[[], Mapping[str, PromptTokenCorrection]]) -> None:
        """Export the prompt-token corrections: ``corrections`` (model → correction) is called at each scrape of
        ``/metrics``."""
        self.registry.register(_PromptTokenCollector(corrections))

    def render(self) -> bytes:
        """Exposition text of every metric."""
        return generate_latest(self.registry)


def sum_samples(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``, in Prometheus exposition ``text``
    (0.0 when there are none): how tests and benchmarks read a gateway's or an engine's ``/metrics``.

    Raises:
        ValueError: ``text`` is not valid exposition text (from :mod:`prometheus_client.parser`).
    """
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )
