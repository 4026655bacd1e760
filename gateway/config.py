"""Gateway settings: a YAML file (``--config`` or ``GATEWAY_CONFIG``) plus ``GATEWAY_*`` environment variables.

Precedence, highest first: explicit keyword arguments, environment variables (nested fields with ``__``, e.g.
``GATEWAY_WINDOW__MAX_INTERVAL_S=0.1``; lists as JSON, e.g. ``GATEWAY_ENGINES='[...]'``), the YAML file,
the defaults below. Settings are built once, by :func:`load_settings`, and passed down; nothing reads the
environment anywhere else.

Invalid settings raise :class:`ConfigError`, whose message names each offending field.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from gateway.scheduling.baselines import IMMEDIATE_POLICIES

if TYPE_CHECKING:
    PolicyName = str
else:
    PolicyName = Literal[("sbs", *IMMEDIATE_POLICIES)]
"""Scheduling policy: ``sbs`` (staggered windows + load-aware allocation) or an immediate-dispatch baseline (the
names of :data:`gateway.scheduling.baselines.IMMEDIATE_POLICIES`)."""

EngineFlavor = Literal["sglang", "vllm"]
EngineRole = Literal["mixed", "prefill", "decode"]
KvConnector = Literal["nixl", "mooncake"]
"""vLLM's KV connectors the gateway speaks (vLLM 0.34 ``distributed/kv_transfer/kv_connector/v1/``)."""
DEFAULT_BOOTSTRAP_PORT = 8998
"""Default bootstrap port of a P/D prefill engine: SGLang 0.5.23's ``--disaggregation-bootstrap-port``
(``arg_groups/fields/disagg.py``) and vLLM 0.34's ``VLLM_MOONCAKE_BOOTSTRAP_PORT`` (``vllm/envs.py``), both 8998."""
PrefillAlignment = Literal["auto", "none", "prefill_delayer", "prefill_schedule_interval"]
"""An engine's own alignment of prefill across its DP ranks: SGLang's ``--enable-prefill-delayer``, vLLM's
``--prefill-schedule-interval N`` (N > 1), neither, or ``auto`` (read from the engine where it says so)."""

PositiveFloat = Annotated[float, Field(gt=0)]


class ConfigError(ValueError):
    """The configuration is invalid; the message names every offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineConfig(_Strict):
    """One engine endpoint: an SGLang or vLLM server with ``dp_size`` DP ranks behind one URL."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Unique name, used in metrics labels and logs."""
    flavor: EngineFlavor
    """Engine kind: decides how a DP rank is pinned and how ``/metrics`` is read."""
    url: str
    """Base URL, ``http(s)://host:port``, without ``/v1``."""
    dp_size: int = Field(default=1, ge=1, le=1024)
    """Number of DP ranks behind the URL (SGLang ``--dp-size``, vLLM ``--data-parallel-size``)."""
    role: EngineRole = "mixed"
    """``mixed`` serves prefill and decode; ``prefill`` or ``decode`` makes it one pool of a P/D disaggregated
    model (its prefill or its decode DP ranks): a model listed by ``prefill`` and ``decode`` engines is served
    P/D, each request sent as a prefill leg and a decode leg (:mod:`gateway.pd`). A model is served one way,
    P/D or mixed, never both."""
    kv_connector: KvConnector | None = None
    """vLLM P/D engines (``role`` ``prefill`` or ``decode``): the KV connector both pools run, ``nixl``
    (NixlConnector: prefill first, decode with what it returns) or ``mooncake`` (MooncakeConnector: both legs at
    once with a gateway-minted ``transfer_id``). Required there, refused elsewhere (SGLang speaks its own
    bootstrap protocol)."""
    bootstrap_port: int | None = Field(default=None, ge=1, le=65535)
    """Prefill engines that serve a bootstrap server: SGLang's ``--disaggregation-bootstrap-port`` (``None``:
    its default, 8998) or vLLM Mooncake's ``VLLM_MOONCAKE_BOOTSTRAP_PORT`` (``None``: its default, 8998), where
    the decode engine fetches the KV cache from. Refused on any other engine (vLLM NIXL has none)."""
    bootstrap_host: str | None = Field(default=None, min_length=1)
    """Prefill engines with a bootstrap server (see ``bootstrap_port``): the host the decode engines reach it at;
    ``None``: the host of ``url``."""
    models: list[str] = Field(min_length=1)
    """Model names the engine serves (the ``model`` field clients send)."""
    prefill_budget_tokens: int = Field(default=8192, ge=1)
    """Prefill tokens one DP rank takes per forward step (SGLang ``--chunked-prefill-size``, vLLM
    ``--max-num-batched-tokens``); the allocator's per-rank capacity."""
    prefill_alignment: PrefillAlignment = "auto"
    """Whether the engine aligns prefill across its DP ranks itself, so that the window does not hold a request
    the engine will hold again (``window.yield_to_engine_alignment``): ``prefill_delayer`` (SGLang
    ``--enable-prefill-delayer``), ``prefill_schedule_interval`` (vLLM ``--prefill-schedule-interval`` above 1),
    ``none``, or ``auto``: SGLang's is read from its ``/get_server_info`` (``enable_prefill_delayer``) once the
    engine answers; vLLM reports no such setting, so ``auto`` means ``none`` there and an engine started with
    the interval must declare it."""

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http(s) URL with a host, got {value!r}")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_pd_fields(self) -> EngineConfig:
        pd_vllm = self.flavor == "vllm" and self.role != "mixed"
        if pd_vllm and self.kv_connector is None:
            raise ValueError(f"kv_connector: a vllm {self.role} engine needs one (nixl or mooncake)")
        if not pd_vllm and self.kv_connector is not None:
            raise ValueError("kv_connector: only vllm prefill and decode engines take one")
        has_bootstrap = self.role == "prefill" and (self.flavor == "sglang" or self.kv_connector == "mooncake")
        for name in ("bootstrap_port", "bootstrap_host"):
            if getattr(self, name) is not None and not has_bootstrap:
                raise ValueError(
                    f"{name}: only prefill engines with a bootstrap server take one (sglang, or vllm with "
                    f"kv_connector mooncake), not a {self.flavor} {self.role} engine"
                    + (f" with kv_connector {self.kv_connector}" if self.kv_connector else "")
                )
        return self

    @property
    def bootstrap_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the engine's bootstrap server (a prefill engine that serves one), else ``None``."""
        if self.role != "prefill" or not (self.flavor == "sglang" or self.kv_connector == "mooncake"):
            return None
        host = self.bootstrap_host or urlsplit(self.url).hostname or ""
        return host, self.bootstrap_port or DEFAULT_BOOTSTRAP_PORT

    @model_validator(mode="after")
    def _check_alignment(self) -> EngineConfig:
        wrong = {"prefill_delayer": "vllm", "prefill_schedule_interval": "sglang"}.get(self.prefill_alignment)
        if wrong == self.flavor:
            raise ValueError(
                f"prefill_alignment: {self.prefill_alignment!r} is not a setting of a {self.flavor} engine "
                "(prefill_delayer is SGLang's, prefill_schedule_interval vLLM's)"
            )
        return self


class ModelConfig(_Strict):
    """How the gateway counts one served model's prompt tokens (see :mod:`gateway.tokens`)."""

    tokenizer: Path | None = None
    """The model's Hugging Face ``tokenizer.json``: prompts are counted with it, chat requests after the chat
    template found next to it (``chat_template.jinja`` or ``tokenizer_config.json``'s ``chat_template``; see
    :mod:`gateway.tokenizer_file`). Loaded at start; a file that cannot be read stops the start. ``None``: the
    four-characters-a-token heuristic."""
    chat_template: bool = True
    """Count a chat request's prompt after rendering the chat template next to ``tokenizer`` (role markers, BOS,
    the generation prompt); ``False`` counts the messages' contents only."""
    max_tokenized_chars: int | None = Field(default=16_384, ge=512)
    """Longest prompt text ``tokenizer`` tokenises whole, characters; a longer one is counted from evenly spaced
    samples of this many characters in all and extrapolated (a whole 32k-token chat holds the event loop for
    tens of milliseconds with DeepSeek-V3's tokenizer; ``bench/results/token_count_cost.md``). ``None``: always
    whole."""
    online_correction: bool = True
    """Scale the count by a factor learnt from the prompt tokens the engines report for this model
    (:class:`gateway.tokens.PromptTokenCorrection`); ``False`` keeps the raw count (the factor is still learnt
    and exported)."""

    @field_validator("tokenizer")
    @classmethod
    def _check_tokenizer(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"tokenizer file not found: {value}")
        return value


class StepAlignedCloseConfig(_Strict):
    """Step-aligned window closing (see :mod:`gateway.scheduling.step_aligned_close`)."""

    lead_s: float = Field(default=0.005, ge=0)
    """How long before a predicted step start the window closes, seconds; covers the dispatch latency and the
    error of the step-time prediction."""


class WindowConfig(_Strict):
    """The staggered window (policy ``sbs``): its interval, how it closes, and how much it may buffer."""

    min_interval_s: PositiveFloat = 0.005
    """Shortest window, seconds."""
    max_interval_s: PositiveFloat = 0.5
    """Longest window, seconds."""
    initial_step_s: PositiveFloat = 0.05
    """Engine step time assumed before any is observed, seconds."""
    step_fraction: PositiveFloat = 0.1
    """Window length as a fraction of the observed engine step time (clamped to the bounds above)."""
    adaptive_interval: bool = True
    """Window length tracks the observed engine step time (``step_fraction`` of it, clamped to the bounds);
    ``False`` keeps it at ``step_fraction * initial_step_s`` (clamped), for ablation."""
    step_aligned_close: StepAlignedCloseConfig | None = None
    """Close the window ``lead_s`` before the next predicted step start of the busy instances (from the
    step boundaries seen in token arrivals), so closes come about one step / instances apart and each batch meets
    an instance as it starts a step; the adaptive grid tick stays when some instance is idle or unseen (see
    :mod:`gateway.scheduling.step_aligned_close`). ``{}`` switches it on with the default lead; ``None``: the grid
    tick only."""
    close_when_idle: bool = True
    """A request arriving to an empty window while some instance that serves its model is idle (no running or
    waiting request and no queued prefill on any rank) is placed at once: the idle instance starts a step as soon
    as it arrives, so holding it only delays its first token. ``False``: it waits for the tick, for ablation."""
    yield_to_engine_alignment: bool = True
    """A request arriving to an empty window while every usable instance that serves its model aligns its own
    prefill (``engines[].prefill_alignment``) is placed at once: the engine holds new prefill until its ranks
    line up, so the window would hold it a second time. ``False``: it waits for the tick, for ablation."""
    hold_min_arrivals: float | None = Field(default=1.0, gt=0)
    """A request arriving to an empty window is placed at once unless at least this many more requests are
    expected while the window is open (its interval over the exponentially weighted mean gap between arrivals):
    a window that will hold one request only delays it. Requests that wait because no rank has room keep the
    window open whatever the rate. ``None``: always hold, for ablation
    (``bench/results/decisions.md#holding-the-window``)."""
    max_buffered_requests: int = Field(default=10_000, ge=1)
    """The window holds at most this many requests; beyond it new requests get 503 with ``Retry-After``."""
    max_buffered_tokens: int = Field(default=20_000_000, ge=1)
    """The window holds at most this many prompt tokens (estimated); beyond it new requests get 503."""
    queue_timeout_s: PositiveFloat = 60.0
    """A request still buffered this long after arriving (every rank full, or no healthy rank) gets 503 with
    ``Retry-After``, seconds. Must exceed ``allocator.max_wait_s`` to matter while some rank is healthy."""

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            _refuse_moved(data, "window.", _MOVED_WINDOW_KEYS)
            if isinstance(data.get("step_aligned_close"), bool):
                raise ValueError(
                    "window.step_aligned_close is a section now: {} (or {lead_s: ...}) switches it on, null off"
                )
        return data

    @model_validator(mode="after")
    def _check_bounds(self) -> WindowConfig:
        if self.min_interval_s > self.max_interval_s:
            raise ValueError("min_interval_s must not exceed max_interval_s")
        return self


_MOVED_WINDOW_KEYS = {
    "allocator": "allocator.kind",
    "decode_stall_weight": "allocator.decode_stall_weight (kind phase_aware)",
    "queue_steps": "allocator.queue_steps",
    "min_queue_tokens": "allocator.min_queue_tokens",
    "max_wait_s": "allocator.max_wait_s",
    "stagger": "allocator.use_step_phase (kind phase_aware)",
    "close_lead_s": "window.step_aligned_close.lead_s",
    "shortest_first": "allocator.shortest_first",
    "long_prefill_isolation": "allocator.long_prefill_tokens (kind phase_aware; null switches it off)",
    "long_prefill_tokens": "allocator.long_prefill_tokens (kind phase_aware)",
    "prefill_capacity": "allocator.queue_steps (null switches the capacity model off)",
    "decode_aware": "decode (null switches the decode-aware choice off)",
    "iqr_outliers": "decode.iqr_k (null switches the outlier test off)",
    "iqr_k": "decode.iqr_k",
    "running_bucket": "decode.running_bucket",
}
"""Keys of the flat ``window`` section before the allocator and decode settings got their own sections."""


def _refuse_moved(data: dict[str, Any], prefix: str, moved: dict[str, str]) -> None:
    found = [f"{prefix}{key} moved to {moved[key]}" for key in data if key in moved]
    if found:
        raise ValueError("; ".join(found))


class _AllocatorBase(_Strict):
    queue_steps: PositiveFloat | None = 2.0
    """A DP rank's prefill capacity, in per-step token budgets: the step in progress plus the next one (see
    :mod:`gateway.scheduling.allocation`); what fits nowhere waits for the next window. ``None`` places every
    request at once (no capacity model), for ablation."""
    min_queue_tokens: int = Field(default=16_384, ge=0)
    """A DP rank's prefill capacity is at least this many prompt tokens, whatever its budget: with small budgets
    (2,048) two budgets would leave every longer prompt waiting for an idle rank (see
    :mod:`gateway.scheduling.allocation`)."""
    max_wait_s: PositiveFloat = 10.0
    """A request deferred this long (no rank had room) is dispatched to the least-loaded rank anyway."""
    shortest_first: bool = False
    """Place a window's shortest prompts first, whatever waited longer (``max_wait_s`` still bounds the wait), so
    that when not all fit the long ones wait; ``False``: deferred requests first, then longest first (the
    water-filling order). A trade of the tail for the mean, for bursty prefill-heavy traffic
    (``bench/results/decisions.md#shortest-first``)."""


class WaterFillConfig(_AllocatorBase):
    """Prefill water-filling over all ranks (see :mod:`gateway.scheduling.allocation`)."""

    kind: Literal["water_fill"] = "water_fill"
    """Allocator kind."""


class PhaseAwareConfig(_AllocatorBase):
    """Placement by predicted time to first token using each instance's step phase (see
    :mod:`gateway.scheduling.phase`)."""

    kind: Literal["phase_aware"] = "phase_aware"
    """Allocator kind."""
    decode_stall_weight: float = Field(default=0.005, ge=0)
    """Weight of one decoding request's stall against one waiting request's TTFT; higher trades TTFT for TPOT
    (see :data:`gateway.scheduling.phase.DECODE_STALL_WEIGHT`,
    ``bench/results/decisions.md#decode-stall-weight``)."""
    use_step_phase: bool = True
    """Place by each instance's step phase, so batches meet instances as they start a step; ``False`` treats
    every instance as ready now, for ablation."""
    long_prefill_tokens: int | None = Field(default=65_536, ge=1)
    """Long-prefill isolation: keep prompts longer than this many tokens together on instances already
    prefilling one, and shorter prompts off those instances where they fit elsewhere: in lockstep a long-context
    chunk sets the step time of the whole instance (see :mod:`gateway.scheduling.phase`). In tokens, not
    chunked-prefill budgets: the step time a long prompt imposes grows with its context. It trades the longest
    prompts' tail for everyone else's TTFT and TPOT (``bench/results/decisions.md#long-prefill-isolation``).
    ``None``: off."""


def _allocator_kind(data: Any) -> str:
    if isinstance(data, dict):
        return str(data.get("kind", "phase_aware"))
    return str(getattr(data, "kind", "phase_aware"))


AllocatorConfig = Annotated[
    Annotated[WaterFillConfig, Tag("water_fill")] | Annotated[PhaseAwareConfig, Tag("phase_aware")],
    Discriminator(_allocator_kind),
]
"""How a window's batch is placed, chosen by ``kind`` (``phase_aware`` when omitted); each kind takes only its
own settings."""


class DecodeConfig(_Strict):
    """Decode-aware choice among ranks the prefill placement leaves equal (:mod:`gateway.scheduling.decode`).

    Two objectives, IQR outliers, lexicographic. The whole section ``None`` falls back to running requests then
    KV usage.
    """

    iqr_k: float | None = Field(default=1.5, ge=0)
    """Avoid ranks above ``Q3 + iqr_k * IQR`` on either objective: the fence multiplier of the outlier test
    (Tukey's 1.5, see :data:`gateway.scheduling.decode.IQR_K`); ``None`` switches the outlier test off."""
    running_bucket: int = Field(default=4, ge=1)
    """Bucket width of the requests objective, requests (see :data:`gateway.scheduling.decode.RUNNING_BUCKET`)."""


class PrefixCacheConfig(_Strict):
    """The gateway's index of what each DP rank's prefix cache probably holds (:mod:`gateway.scheduling.prefix_index`),
    from the prompts it placed there: placements count only the prompt tokens a rank must actually prefill, and the
    load view queues only those. The whole section ``None`` switches it off."""

    capacity_tokens: int = Field(default=600_000, ge=512)
    """Prefix-cache capacity of one DP rank, tokens, beyond which the index forgets least recently used blocks: the
    engine's KV capacity per rank (SGLang's ``sglang:max_total_num_tokens``; vLLM's ``num_gpu_blocks`` times its
    block size). The default is the simulated DeepSeek-V3 rank's (:mod:`gateway.sim.calibration`)."""


class BaselinesConfig(_Strict):
    """The immediate-dispatch baselines (:mod:`gateway.scheduling.baselines`)."""

    seed: int = 0
    """Seed of the randomised baselines (``power_of_two``, ``random``)."""


if TYPE_CHECKING:
    PrefillPolicyName = str
    DecodePolicyName = str
else:
    PrefillPolicyName = Literal[(*IMMEDIATE_POLICIES, "follow_bootstrap_room")]
    DecodePolicyName = Literal[("sbs", *IMMEDIATE_POLICIES)]


class PdConfig(_Strict):
    """P/D disaggregated models: how each leg's DP rank is chosen, as the SGLang Model Gateway's
    ``--prefill-policy`` and ``--decode-policy`` (:mod:`gateway.scheduling.pd`)."""

    prefill_policy: PrefillPolicyName | None = None
    """The prefill leg's rank: an immediate-dispatch baseline (the names of ``policy``) over the prefill ranks,
    or ``follow_bootstrap_room`` (SGLang only: no prefill pin, the prefill engine takes rank ``bootstrap_room %
    dp_size``, so the rank is as random as the room); ``None``: ``policy`` (``sbs``: the window and allocator
    over the prefill ranks)."""
    decode_policy: DecodePolicyName | None = None
    """The decode leg's rank: ``sbs`` (the decode allocation: running requests and KV tokens, IQR outliers,
    lexicographic, :mod:`gateway.scheduling.decode`, with the ``decode`` settings) or an immediate-dispatch
    baseline over the decode ranks; ``None``: ``sbs`` when ``policy`` is ``sbs``, else ``policy``."""


class ScrapeConfig(_Strict):
    """The engines' ``/metrics`` scraper."""

    interval_s: PositiveFloat = 0.5
    """Time between two scrapes of one engine, seconds."""
    timeout_s: PositiveFloat = 2.0
    """Timeout of one scrape, seconds."""
    stale_after_s: PositiveFloat = 3.0
    """Scraped figures older than this are ignored and the load view uses local accounting only, seconds."""
    engine_queued_tokens: bool = False
    """At each scrape also read each DP rank's queued prefill tokens where the engine reports them (SGLang's ``GET
    /v1/loads``, ``num_waiting_uncached_tokens``), and take them as the truth at scrape time in the load view
    (:mod:`gateway.load.view`). Only flavours with such an endpoint are asked (vLLM has none: its ``/load`` gives a
    server-wide request count, 0.32 ``entrypoints/serve/instrumentator/basic.py``); an engine that fails
    :data:`gateway.load.scraper.LOADS_MAX_FAILURES` such polls in a row while its ``/metrics`` answers is not
    asked again. Off by default: it helps on the Azure traces but costs sbs 19% of its TTFT on Mooncake, whose
    long-prefill isolation reads a rank's queue as the sign of a long prompt in prefill
    (``bench/results/token_count_remedies.md``)."""
    running_before_first_token: bool = False
    """The engines count a request as running before its first token reaches the gateway (vLLM from its first
    prefill chunk, SGLang once its prefill step ends): of the gateway's requests without their first token when an
    engine's figures were read, the load view moves only as many as the engine counted waiting from waiting to
    running at their first token (:class:`gateway.load.view.LoadView`). Off (as before): each moves, so a request the
    engine already counted running counts twice until the next scrape; an idle instance then looks busy and sbs's
    window holds a lone request to its tick (``bench/results/dataplane.md``). Off by default this round: it changes
    the simulator's figures."""
    max_response_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    """Largest ``/metrics`` body read from an engine, bytes; a larger one fails the scrape (the rest is not
    read). A real vLLM 0.32 capture of one DP rank is 50-85 KB (``tests/unit/fixtures/metrics``), mostly per-rank
    histograms, so 64 ranks behind one URL come to about 5 MiB: 32 MiB leaves room."""


class UpstreamConfig(_Strict):
    """HTTP client towards the engines: timeouts of each phase of a request, and retries."""

    connect_timeout_s: PositiveFloat = 5.0
    """Timeout to open a connection to an engine, seconds."""
    first_byte_timeout_s: PositiveFloat = 300.0
    """Longest wait from sending a request to its first answer byte (for a stream: its first event), seconds.
    Covers the engine's queueing and prefill, so it must exceed the longest prefill expected under load."""
    idle_timeout_s: PositiveFloat = 300.0
    """Longest silence between two chunks of an answer once it has started, seconds. Must exceed the longest pause
    an engine puts in a stream under load: SGLang retracts running requests when KV runs short and prefills them
    again later (vLLM preempts and recomputes), with no token in between; the simulated SGLang as shipped paused
    a Mooncake stream for 107 s at 64% load (``bench/results/smg_router_mooncake.md``), where 60 s cut 4-8 of
    217 streams that smg, which has no such limit, completed."""
    total_timeout_s: PositiveFloat = 1800.0
    """Longest a whole request may take at the engine, from sending it to its last byte, seconds."""
    max_connections: int = Field(default=0, ge=0)
    """Connection pool size towards all engines; 0 means unbounded."""
    max_attempts: int = Field(default=3, ge=1, le=10)
    """Tries per request, the first included: a request that failed before any byte reached the client
    (engine unreachable, HTTP 5xx, timeout before the first byte, stream broken before its first event) is sent
    again to another DP rank, preferably of another engine. Never retried once the client has received a byte."""
    retry_backoff_s: PositiveFloat = 0.05
    """Base of the exponential backoff between tries, with full jitter (AWS Architecture Blog, "Exponential
    Backoff And Jitter", 2015): the n-th retry waits uniformly in ``[0, min(retry_backoff_max_s, base * 2**n))``."""
    retry_backoff_max_s: PositiveFloat = 1.0
    """Cap of one backoff wait, seconds."""
    retry_throttle_max_tokens: PositiveFloat = 20.0
    """Retry throttling, as gRPC does it (gRFC A6, "Retry throttling"): a token count starts at this maximum,
    every failed try takes one token and every successful one gives back ``retry_throttle_ratio``; retries are
    made only while more than half the maximum is left. So an overloaded cluster, where most tries fail, is not
    sent more work by retries, while the failures of a few ranks or one engine among healthy ones are retried."""
    retry_throttle_ratio: PositiveFloat = 1.0
    """Tokens a successful try gives back (see ``retry_throttle_max_tokens``). With 1.0 retries go on while at
    most about half the tries fail: one engine of two failing outright still has every request retried on the
    other (each retry's success pays back its failure), a cluster where every try times out stops retrying
    after ten failures. gRFC A6's example 0.1 throttles from about one failed try in eleven, too early when one
    engine fails among healthy ones (``bench/results/decisions.md#retry-throttle-ratio``)."""

    stream_nonstreamed: bool = True
    """Ask the engine for a stream when the client asked for one JSON answer (``stream`` false or absent on
    ``/v1/chat/completions`` and ``/v1/completions``) and assemble the answer in the gateway
    (:mod:`gateway.server.assemble`): the scheduler then sees the request's first token and its step boundaries,
    as it does for streams. Off: the request goes to the engine as sent, and the load view guesses when its
    prefill ends (:class:`~gateway.load.view.LoadView`). Requests with ``stream_options``, ``best_of`` or
    ``use_beam_search`` always go as sent."""
    stream_usage: bool = True
    """Ask the engine for usage on a stream whose client did not (``stream_options.include_usage``), to read
    the prompt tokens the engine counted, and drop the usage from the stream before relaying it, so the client
    sees what it asked for. A stream that asked for ``continuous_usage_stats`` alone goes as sent (vLLM and
    SGLang read it differently)."""

    @model_validator(mode="after")
    def _check_timeouts(self) -> UpstreamConfig:
        if self.first_byte_timeout_s > self.total_timeout_s or self.idle_timeout_s > self.total_timeout_s:
            raise ValueError("first_byte_timeout_s and idle_timeout_s must not exceed total_timeout_s")
        return self


class ResponsesConfig(_Strict):
    """The OpenAI Responses API (``/v1/responses``, :mod:`gateway.server.responses`): how long and how many stored
    responses the gateway remembers the engine and DP rank of, to send their follow-ups, retrievals and cancels
    there (the engines keep a stored response in the memory of the process that answered it)."""

    max_remembered: int = Field(default=100_000, ge=1)
    """Response ids remembered at most; beyond it the least recently used is forgotten (its follow-ups then get
    404 ``response_not_found``). About 200 bytes each: 100,000 come to about 20 MiB."""
    ttl_s: float = Field(default=86_400.0, gt=0)
    """A response id not used (created, followed up, retrieved) for this long, seconds, is forgotten. The engines
    never expire their stores (vLLM 0.34, SGLang 0.5.23), so this bounds only the gateway's memory."""


class HealthConfig(_Strict):
    """Engine health: active ``/health`` probes and the circuit breakers fed by them and by failed requests.

    A breaker opens after ``failure_threshold`` consecutive failures: the engine (or one DP rank) takes no new
    requests for ``open_s``, doubled at each failed trial up to ``max_open_s``. Then it is half-open: one
    successful probe (engine) or one successful trial request (rank) closes it.
    """

    probe_interval_s: PositiveFloat = 2.0
    """Time between two ``GET /health`` probes of one engine, seconds."""
    probe_timeout_s: PositiveFloat = 1.0
    """Timeout of one probe, seconds."""
    failure_threshold: int = Field(default=3, ge=1)
    """Consecutive failures (probes, connection errors, HTTP 5xx, timeouts) that open a breaker."""
    open_s: PositiveFloat = 1.0
    """How long a breaker stays open the first time, seconds."""
    max_open_s: PositiveFloat = 30.0
    """Longest a breaker stays open after repeated failed trials, seconds."""


class SchedulerServiceConfig(_Strict):
    """A scheduler service this front door consults per request (``gateway scheduler``, which ``gateway serve
    --workers N`` starts by itself): it holds the window, the allocator, the load view and the engine scrapers of
    every front door, so several front doors place requests from one scheduling view
    (:mod:`gateway.scheduler_service`).

    The front door keeps its own scheduler, load view and scrapers warm, and places requests with them at once
    when the service does not answer within ``deadline_s`` (or answers with an error of its own), until a probe
    finds it answering again.
    """

    url: str = Field(min_length=1)
    """Where the service listens: ``http://host:port`` (TCP) or ``unix:/path/to/socket`` (a Unix socket)."""
    deadline_s: PositiveFloat = 0.05
    """Longest wait for the service's answer to begin (a placement's headers, an events post), seconds; past it
    the front door places locally. The round trip is a fraction of a millisecond with a p99 of 5-8 ms on a shared
    2-core machine (``bench/results/scheduler_transport.json``); 20 ms still timed out under that machine's full
    test suite, so 50 ms: an hiccup must not count as an outage."""
    probe_interval_s: PositiveFloat = 0.25
    """First wait before probing a service that stopped answering (``GET /v1/health``), seconds; doubled after
    each failed probe up to ``probe_max_interval_s``."""
    probe_max_interval_s: PositiveFloat = 5.0
    """Longest wait between two probes of a service that does not answer, seconds."""
    events_flush_s: PositiveFloat = 0.002
    """Token progress is sent to the service at most this often, seconds, in one batch (first tokens, finishes
    and cancellations go on the next turn of the event loop); one batch is in flight at a time."""
    front_door_expiry_s: PositiveFloat = 30.0
    """The service's side: when it has not heard from a front door for this long, seconds, it releases the requests
    that front door placed through it (the front door died, or fell back to local placement, with requests in
    flight; they would otherwise stay counted in the service's own accounting, which scrapes do not correct).
    Every call of a front door (a placement, events, a health probe while it places through the service) counts
    as hearing from it. Twice the longest probe interval and several heartbeats: a hiccup expires nothing."""
    heartbeat_s: PositiveFloat = 5.0
    """A front door placing through the service that has not called it for this long, seconds, sends a heartbeat
    (``GET /v1/health``), so an idle front door's long streams are not expired; must be below
    ``front_door_expiry_s``."""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value.startswith("unix:"):
            if not value.removeprefix("unix:"):
                raise ValueError("a unix: url names the socket's path, e.g. unix:/run/gateway/scheduler.sock")
            return value
        parts = urlsplit(value)
        if parts.scheme != "http" or not parts.hostname or parts.port is None or parts.path not in ("", "/"):
            raise ValueError(f"expected http://host:port or unix:/path, got {value!r}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _probe_intervals(self) -> SchedulerServiceConfig:
        if self.probe_interval_s > self.probe_max_interval_s:
            raise ValueError("probe_interval_s must not exceed probe_max_interval_s")
        if self.heartbeat_s >= self.front_door_expiry_s:
            raise ValueError("heartbeat_s must be below front_door_expiry_s")
        return self


class KubernetesDiscoveryConfig(_Strict):
    """Engine pods found by label selector with the official Kubernetes client (the pod labels and annotations read:
    :mod:`gateway.discovery.kubernetes`)"""

    label_selector: str = Field(min_length=1)
    """Kubernetes label selector of the engine pods, e.g. ``app.kubernetes.io/component=engine``."""
    namespace: str | None = None
    """Namespace to watch; ``None``: the gateway pod's own (its service account's), else ``default``."""
    api_url: str | None = None
    """The API server to ask, without credentials (``kubectl proxy``, tests); ``None``: the in-cluster service
    account, else the local kubeconfig."""
    flavor: EngineFlavor | None = None
    """Flavour of a pod without a ``sbs-gateway/flavor`` label (``None``: such a pod is skipped, with a warning)."""
    port: int = Field(default=8000, ge=1, le=65535)
    """The engines' HTTP port, for a pod without a ``sbs-gateway/port`` annotation."""
    models: list[str] = Field(default_factory=list)
    """Models served by a pod without a ``sbs-gateway/models`` annotation (comma-separated names)."""
    watch_timeout_s: PositiveFloat = 300.0
    """Each watch asks the API server to end it after this long, seconds, and is started again from where it
    was; the client also gives up on a silent connection after it (then lists again)."""


class ShutdownConfig(_Strict):
    """Graceful shutdown on SIGTERM/SIGINT."""

    drain_timeout_s: int = Field(default=30, ge=0)
    """After SIGTERM the gateway stops accepting connections, dispatches what its window holds and lets
    requests in flight finish for at most this long, seconds; then the remaining ones are cancelled (which
    aborts them at the engines). Kubernetes' default ``terminationGracePeriodSeconds`` is 30."""


class SecurityConfig(_Strict):
    """API keys (see :mod:`gateway.server.auth`). With no key configured every endpoint is open.

    Keys come from the lists below (environment: ``GATEWAY_SECURITY__API_KEYS='["key1", "key2"]'``) and/or from
    files with one key a line (blank lines and lines starting with ``#`` are skipped). They are held as
    :class:`~pydantic.SecretStr`, so they never appear in a repr, a log or an error message.
    """

    api_keys: list[SecretStr] = Field(default_factory=list)
    """Keys accepted as ``Authorization: Bearer <key>`` on the OpenAI endpoints (``/v1/...``)."""
    api_keys_file: Path | None = None
    """File of further API keys, one a line."""
    admin_keys: list[SecretStr] = Field(default_factory=list)
    """Keys accepted on the admin/introspection endpoints (``/admin/...``, ``/docs``, ``/openapi.json``, and
    ``/metrics`` when ``metrics_auth`` is ``admin``); an admin key is accepted on the OpenAI endpoints too."""
    admin_keys_file: Path | None = None
    """File of further admin keys, one a line."""
    metrics_auth: Literal["open", "admin"] = "open"
    """``open``: the gateway's ``/metrics`` needs no key (what a Prometheus scrape job expects); ``admin``: it
    needs an admin key (give it to Prometheus as ``authorization: {credentials: ...}``)."""

    @field_validator("api_keys_file", "admin_keys_file")
    @classmethod
    def _check_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"key file not found: {value}")
        return value


DEFAULT_TENANT = "default"
"""The tenant of requests with no tenant's key: the flat ``security.api_keys`` (and admin keys used on the OpenAI
endpoints), or every request when no key is configured."""


class TenantConfig(_Strict):
    """One named tenant: its keys, its priority class and its limits (see :mod:`gateway.server.tenants`)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    """The tenant's name (metric label ``tenant``): letters, digits, ``_``, ``.``, ``-``."""
    api_keys: list[SecretStr] = Field(default_factory=list)
    """The tenant's keys, accepted as ``Authorization: Bearer <key>`` on the OpenAI endpoints."""
    api_keys_file: Path | None = None
    """File of further keys of the tenant, one a line."""
    priority: str | None = None
    """The tenant's priority class, one of ``tenants.classes``; ``None``: ``tenants.default_class``."""
    requests_per_minute: PositiveFloat | None = None
    """Requests a minute the tenant may send (token bucket of one minute's worth); beyond it HTTP 429 with
    ``Retry-After``. ``None``: no limit."""
    tokens_per_minute: PositiveFloat | None = None
    """Prompt plus completion tokens a minute the tenant may use (token bucket of one minute's worth: the prompt
    estimate is taken at admission, corrected by what the engine reports when the answer ends); beyond it HTTP 429
    with ``Retry-After``. ``None``: no limit."""
    weight: PositiveFloat = 1.0
    """The tenant's share under overload relative to other tenants of its class (the virtual token counter grows by
    its service over this weight, ``tenants.fairness``)."""

    @field_validator("api_keys_file")
    @classmethod
    def _check_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"key file not found: {value}")
        return value


class TenantsConfig(_Strict):
    """Named tenants, priority classes, rate limits and fair sharing (see :mod:`gateway.server.tenants` and
    :mod:`gateway.scheduling.fairness`).

    With this section the window places higher classes first and holds the lowest class first when the ranks are
    full; within a class, tenants share by the virtual token counter. Keys of ``security.api_keys`` keep working:
    they belong to the tenant ``default`` (class ``default_class``, no limits). Without it (the default) every
    request is equal and placements are as before.
    """

    classes: list[str] = Field(default_factory=lambda: ["interactive", "standard", "batch"], min_length=1)
    """Priority classes, highest first. The last one, when there are several, is deferrable: under saturation its
    requests wait in the window for room (up to ``window.queue_timeout_s``), are never forced onto a full rank after
    ``allocator.max_wait_s``, and may fill a rank's queue only to ``allocator.queue_steps`` prefill budgets (without
    ``allocator.min_queue_tokens``), so little of it is queued in an engine ahead of a higher class's requests."""
    default_class: str = "standard"
    """Class of requests whose tenant names none (and of the tenant ``default``)."""
    priority_header: str | None = None
    """A request header that sets the class of one request (e.g. ``x-priority``), lowercase; ``None``: off. A value
    that names no class, or a higher class than the tenant's while ``header_may_raise`` is off, gets HTTP 400."""
    header_may_raise: bool = False
    """Whether ``priority_header`` may name a class above the tenant's; ``False``: it may only lower it."""
    fairness: Literal["vtc", "none"] = "vtc"
    """Sharing between tenants of one class when the ranks are full: ``vtc``, the virtual token counter (Sheng et al.,
    OSDI 2024); ``none``: arrival order."""
    vtc_prompt_weight: float = Field(default=1.0, ge=0)
    """``w_p`` of the virtual token counter: the cost of one prompt token (the VTC artifact's ``input_price``)."""
    vtc_output_weight: float = Field(default=2.0, ge=0)
    """``w_q`` of the virtual token counter: the cost of one output token (the VTC artifact's ``output_price``)."""
    tenants: list[TenantConfig] = Field(default_factory=list)
    """The named tenants."""

    @field_validator("priority_header")
    @classmethod
    def _header(cls, value: str | None) -> str | None:
        if value is not None and (not value or value != value.lower() or not value.replace("-", "").isalnum()):
            raise ValueError(f"expected a lowercase header name such as x-priority, got {value!r}")
        return value

    @model_validator(mode="after")
    def _names(self) -> TenantsConfig:
        problems = []
        if len(set(self.classes)) != len(self.classes):
            problems.append(f"classes: duplicate class names in {self.classes}")
        if self.default_class not in self.classes:
            problems.append(f"default_class: {self.default_class!r} is not one of classes {self.classes}")
        names = [t.name for t in self.tenants]
        dupes = sorted({n for n in names if names.count(n) > 1} | ({DEFAULT_TENANT} & set(names)))
        if dupes:
            problems.append(f"tenants: duplicate or reserved tenant names {dupes}")
        for i, tenant in enumerate(self.tenants):
            if tenant.priority is not None and tenant.priority not in self.classes:
                problems.append(f"tenants[{i}].priority: {tenant.priority!r} is not one of classes {self.classes}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class LogConfig(_Strict):
    """Logging (see :mod:`gateway.logs`)."""

    format: Literal["json", "text"] = "text"
    """``json``: one JSON object a line (for log pipelines); ``text``: human-readable lines."""
    access_log: bool = True
    """Write one ``gateway.access`` line per request (method, path, status, request id, engine, rank, window,
    timings; never the body)."""


class Settings(BaseSettings):
    """All gateway settings. Build with :func:`load_settings`."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", env_nested_delimiter="__", extra="forbid", frozen=True)

    policy: PolicyName = "sbs"
    """Scheduling policy."""
    engines: list[EngineConfig] = Field(default_factory=list)
    """Engines to route to; empty means the embedded default (simulated engines in-process)."""
    host: str = "127.0.0.1"
    """Address the gateway listens on."""
    port: int = Field(default=8000, ge=0, le=65535)
    """Port the gateway listens on (0 picks a free one)."""
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    """Largest request body accepted, bytes; larger bodies get 413 (long prompts and inline images fit in 32 MiB)."""
    max_tokens_limit: int = Field(default=1_048_576, ge=1)
    """Largest ``max_tokens``/``max_completion_tokens`` accepted, tokens; above it the request gets 400. Above
    any served model's context (the largest common ones hold 128k-1M tokens), so only absurd values are refused
    before they skew the allocator's load accounting."""
    default_max_tokens: int = Field(default=256, ge=1)
    """Output tokens assumed for load accounting when a request sets no ``max_tokens``."""
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    """Per served model (the ``model`` clients send): how its prompt tokens are counted. A model without an entry
    uses the defaults of :class:`ModelConfig`."""
    window: WindowConfig = WindowConfig()
    allocator: AllocatorConfig = PhaseAwareConfig()
    """Policy ``sbs``: how a window's batch is placed, by ``kind``: ``phase_aware`` (by predicted time to first
    token using each instance's step phase, :mod:`gateway.scheduling.phase`) or ``water_fill`` (prefill
    water-filling over all ranks, :mod:`gateway.scheduling.allocation`)."""
    decode: DecodeConfig | None = DecodeConfig()
    """Policy ``sbs``: the decode-aware choice among ranks the prefill placement leaves equal; ``None`` falls
    back to running requests then KV usage."""
    prefix_cache: PrefixCacheConfig | None = PrefixCacheConfig()
    """The index of each rank's prefix cache every policy's placements are recorded in, and ``sbs`` and
    ``phase_aware`` place by; ``None`` switches it off."""
    baselines: BaselinesConfig = BaselinesConfig()
    pd: PdConfig = PdConfig()
    scrape: ScrapeConfig = ScrapeConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    health: HealthConfig = HealthConfig()
    responses: ResponsesConfig = ResponsesConfig()
    scheduler_service: SchedulerServiceConfig | None = None
    """The scheduler service front doors share (:class:`SchedulerServiceConfig`); ``None``, the default, schedules in
    this process alone."""
    discovery: KubernetesDiscoveryConfig | None = None
    """Engines discovered at runtime as Kubernetes pods, besides ``engines`` (``None``: off)."""
    shutdown: ShutdownConfig = ShutdownConfig()
    security: SecurityConfig = SecurityConfig()
    tenants: TenantsConfig | None = None
    """Named tenants, priority classes, per-tenant rate limits and fair sharing (:class:`TenantsConfig`); ``None``,
    the default, treats every request alike."""
    log: LogConfig = LogConfig()
    embedded_speed: PositiveFloat = 1.0
    """Clock speed of the embedded simulated engines (used only when ``engines`` is empty)."""

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            _refuse_moved(data, "", {"seed": "baselines.seed"})
        return data

    @model_validator(mode="after")
    def _unique_engines(self) -> Settings:
        names = [e.name for e in self.engines]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"engines: duplicate engine names {dupes}")
        return self

    @model_validator(mode="after")
    def _models_served(self) -> Settings:
        served = set(self.served_models())
        unserved = sorted(m for m in self.models if m not in served)
        if self.engines and unserved:
            raise ValueError(f"models: no engine serves {unserved} (engines[].models lists the served names)")
        return self

    @model_validator(mode="after")
    def _pd_models(self) -> Settings:
        problems = [p for model in self.served_models() for p in self._pd_problems(model)]
        uses_room = self.pd.prefill_policy == "follow_bootstrap_room"
        vllm_pd = [e.name for e in self.engines if e.role == "prefill" and e.flavor == "vllm"]
        if uses_room and vllm_pd:
            problems.append(
                f"pd.prefill_policy: follow_bootstrap_room is SGLang's; vllm prefill engines {vllm_pd} have no room"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _pd_problems(self, model: str) -> list[str]:
        """What is wrong with how ``model`` is served P/D (empty when nothing, or when it is served mixed)."""
        listed = [(i, e) for i, e in enumerate(self.engines) if model in e.models]
        by_role = {role: [(i, e) for i, e in listed if e.role == role] for role in ("mixed", "prefill", "decode")}
        if not by_role["prefill"] and not by_role["decode"]:
            return []
        (first, engine), *_ = by_role["prefill"] or by_role["decode"]
        names = {role: [e.name for _, e in pairs] for role, pairs in by_role.items()}
        if by_role["mixed"]:
            i = by_role["mixed"][0][0]
            return [
                f"engines[{i}].role: model {model!r} is served P/D (prefill {names['prefill']}, decode "
                f"{names['decode']}) and by mixed engines {names['mixed']}: a model is served one way, list it on "
                "either"
            ]
        for have, lack in (("prefill", "decode"), ("decode", "prefill")):
            if not by_role[lack]:
                i = by_role[have][0][0]
                return [f"engines[{i}].models: model {model!r} has {have} engines {names[have]} but no {lack} engine"]
        out = []
        for i, other in listed:
            if other.flavor != engine.flavor:
                out.append(
                    f"engines[{i}].flavor: {other.flavor}, but engines[{first}] ({engine.name}) serving P/D model "
                    f"{model!r} is {engine.flavor}: a model's prefill and decode engines speak one protocol"
                )
            elif other.kv_connector != engine.kv_connector:
                out.append(
                    f"engines[{i}].kv_connector: {other.kv_connector}, but engines[{first}] ({engine.name}) serving "
                    f"P/D model {model!r} has {engine.kv_connector}: a model's prefill and decode engines run one "
                    "connector"
                )
        return out

    def pd_models(self) -> list[str]:
        """Served models whose engines are prefill and decode pools (P/D disaggregated), in configuration order."""
        return [m for m in self.served_models() if any(e.role == "prefill" and m in e.models for e in self.engines)]

    def served_models(self) -> list[str]:
        """Model names served by at least one engine, in configuration order."""
        seen: dict[str, None] = {}
        for engine in self.engines:
            for model in engine.models:
                seen.setdefault(model, None)
        return list(seen)


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "<root>"
        lines.append(f"  {field}: {err['msg']}")
    return "\n".join(lines)


def load_settings(config_path: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from a YAML file, ``GATEWAY_*`` environment variables and keyword overrides.

    Args:
        config_path: YAML file; when ``None``, ``GATEWAY_CONFIG`` is used if set, else no file.
        overrides: field values that win over every other source (e.g. ``host``, ``port`` from the CLI).

    Raises:
        ConfigError: the file is missing or not a mapping, or a field is invalid (the message names it).
    """
    import os

    path = config_path or os.environ.get("GATEWAY_CONFIG")
    yaml_path: Path | None = None
    if path:
        yaml_path = Path(path)
        if not yaml_path.is_file():
            raise ConfigError(f"configuration file not found: {yaml_path}")

    class _FromFile(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if yaml_path is not None:
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_path))
            return tuple(sources)

    source = str(yaml_path) if yaml_path else "environment"
    try:
        built = _FromFile(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from exc
    except Exception as exc:  # YAML syntax errors and the like
        raise ConfigError(f"invalid configuration ({source}): {exc}") from exc
    # Hand back a plain Settings (values already validated): an instance of the local class above would compare
    # unequal to identical settings (pydantic's == compares classes) and could not be pickled.
    return Settings.model_construct(_fields_set=built.model_fields_set, **dict(built))
