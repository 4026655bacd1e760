"""Prometheus ``/metrics`` of a simulated engine, with the real engines' names and labels (docs/design.md §4.1, §4.2).

One :class:`MockEngineMetrics` per app: a private ``CollectorRegistry`` holding one custom collector, so
nothing touches prometheus_client's global registry and no ``*_created`` series are emitted (as in the real
engines' multiprocess mode). Load gauges are read from the model at scrape time; counters and histograms
are accumulated from the runtime's events (latencies in wall-clock seconds).

vLLM flavour (every series labelled ``model_name`` and ``engine`` = DP rank):
``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc`` (gauges);
``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``, ``vllm:num_preemptions_total``,
``vllm:request_success_total{finished_reason=stop|length|abort|error}``, ``vllm:prefix_cache_queries_total`` and
``vllm:prefix_cache_hits_total`` (prompt tokens looked up in and found in the rank's prefix cache, re-admissions
after a preemption not counted; vllm/v1/metrics/loggers.py, 0.34) (counters);
``vllm:time_to_first_token_seconds``, ``vllm:inter_token_latency_seconds``,
``vllm:e2e_request_latency_seconds``, ``vllm:iteration_tokens_total`` (histograms).

SGLang flavour: per-rank scheduler gauges labelled ``model_name``, ``engine_type="unified"``,
``tp_rank="0"``, ``pp_rank="0"``, ``moe_ep_rank`` and ``dp_rank`` (both = DP rank): ``sglang:num_running_reqs``,
``sglang:num_queue_reqs``, ``sglang:token_usage``, ``sglang:num_used_tokens``, ``sglang:max_total_num_tokens``,
``sglang:gen_throughput``, ``sglang:cache_hit_rate`` (cached over cached plus prefilled tokens of the rank's latest
prefill step; 0 without a prefix cache) and the counter ``sglang:prefill_effective_tokens_total{mode=input|device_hit}``
(prompt tokens prefilled and found in the cache; sglang/srt/observability/metrics_collector.py, 0.5.23); tokenizer-side
series labelled ``model_name`` only: ``sglang:prompt_tokens_total``, ``sglang:generation_tokens_total``,
``sglang:num_aborted_requests_total``, ``sglang:num_requests_total`` (counters) and the three latency
histograms ``sglang:time_to_first_token_seconds``, ``sglang:inter_token_latency_seconds``,
``sglang:e2e_request_latency_seconds``.

A P/D vLLM decode engine (a KV consumer) counts the requests waiting for or fetching their KV in
``vllm:num_requests_waiting`` (``Scheduler.get_request_counts``: ``waiting`` plus ``async_kv_waiting``,
vllm/v1/core/sched/scheduler.py) and exports ``vllm:num_requests_kv_fetch_by_stage{stage=waiting_to_start|
in_progress|completed_waiting}`` (vllm/v1/metrics/loggers.py, 0.34; the mock has no ``completed_waiting``: a request
whose KV has arrived runs at once).

A P/D SGLang engine labels its scheduler gauges ``engine_type="prefill"`` or ``"decode"``
(``DisaggregationMode.to_engine_type``, sglang/srt/disaggregation/utils.py) and adds, per rank,
``sglang:num_prefill_bootstrap_queue_reqs``, ``sglang:num_prefill_inflight_queue_reqs``,
``sglang:num_decode_prealloc_queue_reqs`` and ``sglang:num_decode_transfer_queue_reqs``
(sglang/srt/observability/metrics_collector.py, 0.5.23).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.sim.engine_model import RankStats, StepResult, TokenEvent
from gateway.sim.mock_engine.protocol import Flavor
from gateway.sim.mock_engine.runtime import GenerationHandle

TTFT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
"""Time-to-first-token buckets, seconds (vLLM V1 ``vllm/v1/metrics/loggers.py``; reused for SGLang)."""

ITL_BUCKETS_S = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
"""Inter-token latency buckets, seconds (vLLM V1; reused for SGLang)."""

E2E_BUCKETS_S = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0,
)  # fmt: skip
"""End-to-end request latency buckets, seconds (vLLM V1; reused for SGLang)."""

ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
"""Tokens-per-step buckets of ``vllm:iteration_tokens_total``, tokens."""

GEN_THROUGHPUT_WINDOW_STEPS = 40
"""Steps averaged by ``sglang:gen_throughput`` (SGLang logs decode stats every 40 steps by default)."""

FINISHED_REASONS = ("stop", "length", "abort", "error")
"""``finished_reason`` values of ``vllm:request_success_total``."""


class _Histogram:
    """Bucket counts and sums keyed by a label-value tuple."""

    def __init__(self, name: str, doc: str, label_names: Sequence[str], buckets: Sequence[float]) -> None:
        self.name, self.doc, self.label_names, self.buckets = name, doc, list(label_names), tuple(buckets)
        self._counts: dict[tuple[str, ...], list[int]] = {}
        self._sums: dict[tuple[str, ...], float] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        counts = self._counts.setdefault(labels, [0] * (len(self.buckets) + 1))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self._sums[labels] = self._sums.get(labels, 0.0) + value

    def family(self, all_labels: Iterable[tuple[str, ...]]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.label_names)
        for labels in all_labels:
            counts = self._counts.get(labels, [0] * (len(self.buckets) + 1))
            cumulative, buckets = 0, []
            for bound, count in zip([*self.buckets, float("inf")], counts, strict=True):
                cumulative += count
                buckets.append((_bound_text(bound), float(cumulative)))
            family.add_metric(list(labels), buckets, self._sums.get(labels, 0.0))
        return family


def _bound_text(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class MockEngineMetrics(Collector):
    """Metrics of one simulated engine; also the runtime's :class:`RuntimeObserver`.

    Args:
        flavor: which engine's metric names and labels to emit.
        model_name: the ``model_name`` label value.
        dp_size: number of DP ranks.
        rank_stats: returns the model's per-rank snapshot; called at scrape time.
        role: the engine's P/D role (``"mixed"``, ``"prefill"`` or ``"decode"``); ``bootstrap_queue`` (set by a
            SGLang prefill) gives each rank's requests waiting for their decode side.
    """

    def __init__(
        self,
        flavor: Flavor,
        model_name: str,
        dp_size: int,
        rank_stats: Callable[[], list[RankStats]],
        role: str = "mixed",
    ) -> None:
        self.flavor, self.model_name, self.dp_size = flavor, model_name, dp_size
        self._rank_stats = rank_stats
        self.role = role
        self.engine_type = {"prefill": "prefill", "decode": "decode"}.get(role, "unified")
        self.bootstrap_queue: Callable[[int], int] = lambda _rank: 0
        self.prompt_tokens = [0] * dp_size
        self.generation_tokens = [0] * dp_size
        self.finished = {(rank, reason): 0 for rank in range(dp_size) for reason in FINISHED_REASONS}
        self._gen_window: list[deque[tuple[int, float]]] = [
            deque(maxlen=GEN_THROUGHPUT_WINDOW_STEPS) for _ in range(dp_size)
        ]
        prefix = "vllm" if flavor == "vllm" else "sglang"
        labels = ["model_name", "engine"] if flavor == "vllm" else ["model_name"]
        self._ttft = _Histogram(
            f"{prefix}:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            labels,
            TTFT_BUCKETS_S,
        )
        self._itl = _Histogram(
            f"{prefix}:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            labels,
            ITL_BUCKETS_S,
        )
        self._e2e = _Histogram(
            f"{prefix}:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            labels,
            E2E_BUCKETS_S,
        )
        self._iteration = _Histogram(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            labels,
            ITERATION_TOKENS_BUCKETS,
        )
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def render(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4)."""
        return generate_latest(self.registry)

    def _labels(self, rank: int) -> tuple[str, ...]:
        return (self.model_name, str(rank)) if self.flavor == "vllm" else (self.model_name,)

    # RuntimeObserver
    def on_token(self, handle: GenerationHandle, event: TokenEvent, now_s: float) -> None:
        labels = self._labels(handle.rank)
        self.generation_tokens[handle.rank] += 1
        if event.index == 0:
            self.prompt_tokens[handle.rank] += handle.prompt_tokens
            self._ttft.observe(labels, now_s - handle.arrival_s)
        elif handle.last_token_s is not None:
            self._itl.observe(labels, now_s - handle.last_token_s)
        if event.finished:
            self._e2e.observe(labels, now_s - handle.arrival_s)
            self.finished[handle.rank, handle.finish_reason] += 1

    def on_abort(self, handle: GenerationHandle, now_s: float) -> None:
        self.finished[handle.rank, "abort"] += 1

    def on_step(self, result: StepResult, wall_s: float) -> None:
        produced = [0] * self.dp_size
        for token in result.tokens:
            produced[token.rank] += 1
        for rank in range(self.dp_size):
            self._gen_window[rank].append((produced[rank], wall_s))
            step_tokens = result.prefill_tokens_per_rank[rank] + result.decode_reqs_per_rank[rank]
            if self.flavor == "vllm" and step_tokens:
                self._iteration.observe(self._labels(rank), step_tokens)

    def on_idle(self) -> None:
        for window in self._gen_window:
            window.clear()

    def gen_throughput(self, rank: int) -> float:
        """Output tokens per wall-clock second of ``rank`` over the recent steps (0 when idle)."""
        window = self._gen_window[rank]
        seconds = sum(s for _, s in window)
        return sum(n for n, _ in window) / seconds if seconds > 0 else 0.0

    # Collector
    def collect(self) -> Iterator[Metric]:
        stats = self._rank_stats()
        if self.flavor == "vllm":
            yield from self._collect_vllm(stats)
        else:
            yield from self._collect_sglang(stats)

    def _collect_vllm(self, stats: list[RankStats]) -> Iterator[Metric]:
        names = ["model_name", "engine"]
        gauges = (
            ("vllm:num_requests_running", "Number of requests in model execution batches.", "running"),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", "waiting"),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", "kv_usage"),
        )
        for name, doc, attr in gauges:
            gauge = GaugeMetricFamily(name, doc, labels=names)
            for s in stats:
                value = getattr(s, attr) + (s.prealloc + s.transfer if attr == "waiting" else 0)
                gauge.add_metric(list(self._labels(s.rank)), float(value))
            yield gauge
        if self.role == "decode":
            fetch = GaugeMetricFamily(
                "vllm:num_requests_kv_fetch_by_stage",
                "Number of waiting requests by async KV load stage.",
                labels=[*names, "stage"],
            )
            for s in stats:
                for stage, value in (("waiting_to_start", s.prealloc), ("in_progress", s.transfer)):
                    fetch.add_metric([*self._labels(s.rank), stage], float(value))
                fetch.add_metric([*self._labels(s.rank), "completed_waiting"], 0.0)
            yield fetch
        preemptions = [s.preemptions for s in stats]
        counters = (
            ("vllm:prompt_tokens", "Number of prefill tokens processed.", self.prompt_tokens),
            ("vllm:generation_tokens", "Number of generation tokens processed.", self.generation_tokens),
            ("vllm:num_preemptions", "Cumulative number of preemption from the engine.", preemptions),
            (
                "vllm:prefix_cache_queries",
                "Prefix cache queries, in terms of number of queried tokens.",
                [s.prefix_cache_queries for s in stats],
            ),
            (
                "vllm:prefix_cache_hits",
                "Prefix cache hits, in terms of number of cached tokens.",
                [s.prefix_cache_hits for s in stats],
            ),
        )
        for name, doc, values in counters:
            counter = CounterMetricFamily(name, doc, labels=names)
            for rank, value in enumerate(values):
                counter.add_metric(list(self._labels(rank)), float(value))
            yield counter
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=[*names, "finished_reason"],
        )
        for (rank, reason), value in self.finished.items():
            success.add_metric([*self._labels(rank), reason], float(value))
        yield success
        all_labels = [self._labels(rank) for rank in range(self.dp_size)]
        for histogram in (self._ttft, self._itl, self._e2e, self._iteration):
            yield histogram.family(all_labels)

    def _collect_sglang(self, stats: list[RankStats]) -> Iterator[Metric]:
        names = ["model_name", "engine_type", "tp_rank", "pp_rank", "moe_ep_rank", "dp_rank"]
        gauges: tuple[tuple[str, str, Callable[[RankStats], float]], ...] = (
            ("sglang:num_running_reqs", "The number of running requests.", lambda s: s.running),
            ("sglang:num_queue_reqs", "The number of requests in the waiting queue.", lambda s: s.waiting),
            ("sglang:token_usage", "The token usage.", lambda s: s.kv_usage),
            ("sglang:num_used_tokens", "The number of used tokens.", lambda s: s.kv_used_tokens),
            (
                "sglang:max_total_num_tokens",
                "Maximum total number of tokens.",
                lambda s: s.kv_capacity_tokens,
            ),
            (
                "sglang:gen_throughput",
                "The generation throughput (token/s).",
                lambda s: self.gen_throughput(s.rank),
            ),
            ("sglang:cache_hit_rate", "The prefix cache hit rate.", lambda s: s.cache_hit_rate),
        )
        if self.role != "mixed":
            gauges += (
                (
                    "sglang:num_prefill_bootstrap_queue_reqs",
                    "The number of requests in the prefill bootstrap queue.",
                    lambda s: self.bootstrap_queue(s.rank),
                ),
                (
                    "sglang:num_prefill_inflight_queue_reqs",
                    "The number of requests in the prefill inflight queue.",
                    lambda s: s.held,
                ),
                (
                    "sglang:num_decode_prealloc_queue_reqs",
                    "The number of requests in the decode prealloc queue.",
                    lambda s: s.prealloc,
                ),
                (
                    "sglang:num_decode_transfer_queue_reqs",
                    "The number of requests in the decode transfer queue.",
                    lambda s: s.transfer,
                ),
            )
        for name, doc, value in gauges:
            gauge = GaugeMetricFamily(name, doc, labels=names)
            for s in stats:
                rank = str(s.rank)
                gauge.add_metric([self.model_name, self.engine_type, "0", "0", rank, rank], float(value(s)))
            yield gauge
        effective = CounterMetricFamily(
            "sglang:prefill_effective_tokens",
            "Effective prefill tokens with retracted-request re-counts excluded. mode: device_hit, input.",
            labels=[*names, "mode"],
        )
        for s in stats:
            rank = str(s.rank)
            labels = [self.model_name, self.engine_type, "0", "0", rank, rank]
            effective.add_metric([*labels, "input"], float(s.prefix_cache_queries - s.prefix_cache_hits))
            effective.add_metric([*labels, "device_hit"], float(s.prefix_cache_hits))
        yield effective
        finished = sum(self.finished.values())
        aborted = sum(self.finished[rank, "abort"] for rank in range(self.dp_size))
        counters = (
            ("sglang:prompt_tokens", "Number of prefill tokens processed.", sum(self.prompt_tokens)),
            (
                "sglang:generation_tokens",
                "Number of generation tokens processed.",
                sum(self.generation_tokens),
            ),
            ("sglang:num_aborted_requests", "Number of requests aborted.", aborted),
            ("sglang:num_requests", "Number of requests processed.", finished),
        )
        for name, doc, total in counters:
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            counter.add_metric([self.model_name], float(total))
            yield counter
        for histogram in (self._ttft, self._itl, self._e2e):
            yield histogram.family([(self.model_name,)])
