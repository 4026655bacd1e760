"""Gateway settings: a YAML file (``--config`` or ``GATEWAY_CONFIG``) plus ``GATEWAY_*`` environment variables.

Precedence, highest first: explicit keyword arguments, environment variables (nested fields with ``__``, e.g.
``GATEWAY_WINDOW__MAX_INTERVAL_S=0.1``; lists as JSON, e.g. ``GATEWAY_ENGINES='[...]'``), the YAML file,
the defaults below. Settings are built once, by :func:`load_settings`, and passed down; nothing reads the
environment anywhere else.

Invalid settings raise :class:`ConfigError`, whose message names each offending field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

PolicyName = Literal[
    "sbs",
    "round_robin",
    "shortest_queue",
    "least_tokens",
    "sglang_total_tokens",
    "power_of_two",
    "random",
    "vllm_internal",
]
"""Scheduling policy: ``sbs`` (staggered windows + load-aware allocation) or an immediate-dispatch baseline."""

EngineFlavor = Literal["sglang", "vllm"]
EngineRole = Literal["mixed", "prefill", "decode"]

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
    """``mixed`` serves prefill and decode; ``prefill``/``decode`` are reserved for P/D disaggregation."""
    models: list[str] = Field(min_length=1)
    """Model names the engine serves (the ``model`` field clients send)."""
    prefill_budget_tokens: int = Field(default=8192, ge=1)
    """Prefill tokens one DP rank takes per forward step (SGLang ``--chunked-prefill-size``, vLLM
    ``--max-num-batched-tokens``); the allocator's per-rank capacity."""

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http(s) URL with a host, got {value!r}")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment")
        return value.rstrip("/")

    @field_validator("role")
    @classmethod
    def _check_role(cls, value: str) -> str:
        if value != "mixed":
            raise ValueError("only 'mixed' is supported until P/D disaggregation lands")
        return value


class WindowConfig(_Strict):
    """The staggered window (policy ``sbs``)."""

    min_interval_s: PositiveFloat = 0.005
    """Shortest window, seconds."""
    max_interval_s: PositiveFloat = 0.5
    """Longest window, seconds."""
    initial_step_s: PositiveFloat = 0.05
    """Engine step time assumed before any is observed, seconds."""
    step_fraction: PositiveFloat = 0.1
    """Window length as a fraction of the observed engine step time (clamped to the bounds above)."""
    allocator: Literal["water_fill", "phase_aware"] = "phase_aware"
    """How a window's batch is placed: prefill water-filling over all ranks, or by predicted time to first
    token using each instance's step phase (see :mod:`gateway.scheduling.phase`)."""
    decode_stall_weight: float = Field(default=0.01, ge=0)
    """``phase_aware`` only: weight of one decoding request's stall against one waiting request's TTFT; higher
    trades TTFT for TPOT (see :data:`gateway.scheduling.phase.DECODE_STALL_WEIGHT`)."""
    queue_steps: PositiveFloat = 2.0
    """A DP rank's prefill capacity, in per-step token budgets: the step in progress plus the next one (see
    :mod:`gateway.scheduling.allocation`)."""
    max_buffered_requests: int = Field(default=10_000, ge=1)
    """The window holds at most this many requests; beyond it new requests get 503 with ``Retry-After``."""
    max_buffered_tokens: int = Field(default=20_000_000, ge=1)
    """The window holds at most this many prompt tokens (estimated); beyond it new requests get 503."""
    max_wait_s: PositiveFloat = 10.0
    """A request deferred this long (no rank had room) is dispatched to the least-loaded rank anyway."""
    adaptive_interval: bool = True
    """Window length tracks the observed engine step time (``step_fraction`` of it, clamped to the bounds);
    ``False`` keeps it at ``step_fraction * initial_step_s`` (clamped), for ablation."""
    stagger: bool = True
    """``phase_aware`` only: place by each instance's step phase, so batches meet instances as they start a step;
    ``False`` treats every instance as ready now, for ablation."""
    prefill_capacity: bool = True
    """Water-filling's per-rank capacity model (``queue_steps`` budgets): what fits nowhere waits for the next
    window; ``False`` places every request at once, for ablation."""
    decode_aware: bool = True
    """Decode-aware choice (two objectives, IQR outliers, lexicographic; :mod:`gateway.scheduling.decode`)
    among ranks the prefill placement leaves equal; ``False`` falls back to running requests then KV usage."""
    iqr_outliers: bool = True
    """``decode_aware`` only: avoid ranks above ``Q3 + iqr_k * IQR`` on either objective."""
    iqr_k: float = Field(default=1.5, ge=0)
    """Fence multiplier of the outlier test (Tukey's 1.5, see :data:`gateway.scheduling.decode.IQR_K`)."""
    running_bucket: int = Field(default=4, ge=1)
    """``decode_aware`` only: bucket width of the requests objective, requests (see
    :data:`gateway.scheduling.decode.RUNNING_BUCKET`)."""

    @model_validator(mode="after")
    def _check_bounds(self) -> WindowConfig:
        if self.min_interval_s > self.max_interval_s:
            raise ValueError("min_interval_s must not exceed max_interval_s")
        return self


class ScrapeConfig(_Strict):
    """The engines' ``/metrics`` scraper."""

    interval_s: PositiveFloat = 0.5
    """Time between two scrapes of one engine, seconds."""
    timeout_s: PositiveFloat = 2.0
    """Timeout of one scrape, seconds."""
    stale_after_s: PositiveFloat = 3.0
    """Scraped figures older than this are ignored and the load view uses local accounting only, seconds."""


class UpstreamConfig(_Strict):
    """HTTP client towards the engines."""

    connect_timeout_s: PositiveFloat = 5.0
    """Timeout to open a connection to an engine, seconds."""
    read_timeout_s: PositiveFloat = 600.0
    """Longest silence allowed while reading an engine's answer (between chunks), seconds."""
    max_connections: int = Field(default=0, ge=0)
    """Connection pool size towards all engines; 0 means unbounded."""


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
    default_max_tokens: int = Field(default=256, ge=1)
    """Output tokens assumed for load accounting when a request sets no ``max_tokens``."""
    seed: int = 0
    """Seed for randomised policies (``power_of_two``)."""
    window: WindowConfig = WindowConfig()
    scrape: ScrapeConfig = ScrapeConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    embedded_speed: PositiveFloat = 1.0
    """Clock speed of the embedded simulated engines (used only when ``engines`` is empty)."""

    @model_validator(mode="after")
    def _unique_engines(self) -> Settings:
        names = [e.name for e in self.engines]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"engines: duplicate engine names {dupes}")
        return self

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
