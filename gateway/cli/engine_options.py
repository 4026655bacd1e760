"""The engine-model options of ``gateway mock-engine`` and ``gateway simulate``: a profile and the engines' own flags.

``--profile idealised`` (the default) is the engine model every figure so far was computed with; ``--profile
as-shipped`` is SGLang or vLLM as they ship (:meth:`gateway.sim.calibration.EngineModelConfig.as_shipped`), and only
then do the engines' own flags apply, each under the engine's own name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal, TypeVar

import click

from gateway.sim.calibration import PRODUCTION_PREFILL_TOKENS_PER_S, EngineModelConfig

F = TypeVar("F", bound=Callable[..., Any])

Profile = Literal["idealised", "as-shipped"]

ENGINE_FLAGS: dict[str, tuple[str, str]] = {
    "chunked_prefill_size": ("--chunked-prefill-size", "sglang"),
    "max_running_requests": ("--max-running-requests", "sglang"),
    "enable_mixed_chunk": ("--enable-mixed-chunk", "sglang"),
    "schedule_conservativeness": ("--schedule-conservativeness", "sglang"),
    "disable_overlap_schedule": ("--disable-overlap-schedule", "sglang"),
    "max_num_batched_tokens": ("--max-num-batched-tokens", "vllm"),
    "max_num_seqs": ("--max-num-seqs", "vllm"),
    "async_scheduling": ("--async-scheduling/--no-async-scheduling", "vllm"),
    "disable_radix_cache": ("--disable-radix-cache", "sglang"),
    "enable_prefix_caching": ("--enable-prefix-caching/--no-enable-prefix-caching", "vllm"),
    "enable_prefill_delayer": ("--enable-prefill-delayer", "sglang"),
    "prefill_delayer_max_delay_passes": ("--prefill-delayer-max-delay-passes", "sglang"),
    "prefill_delayer_token_usage_low_watermark": ("--prefill-delayer-token-usage-low-watermark", "sglang"),
    "prefill_schedule_interval": ("--prefill-schedule-interval", "vllm"),
}
"""Each engine flag: its parameter name, its command-line name and the engine that owns it."""

ALIGNMENT_FLAGS = (
    "enable_prefill_delayer",
    "prefill_delayer_max_delay_passes",
    "prefill_delayer_token_usage_low_watermark",
    "prefill_schedule_interval",
)
"""The engines' own prefill alignment (:class:`~gateway.sim.calibration.EngineModelConfig` fields of the same
names), set on the as-shipped profile after its defaults."""


def _alignment_options(delayer_flag: str) -> list[Callable[[F], F]]:
    """The alignment flags; ``delayer_flag`` names SGLang's ``--enable-prefill-delayer`` on this command."""
    return [
        click.option(
            delayer_flag,
            "enable_prefill_delayer",
            is_flag=True,
            help="SGLang --enable-prefill-delayer: hold prefill on every DP rank until all can prefill, for a bounded "
            "number of passes.",
        ),
        click.option(
            "--prefill-delayer-max-delay-passes",
            type=click.IntRange(min=1),
            default=None,
            help="SGLang: most passes a prefill hold lasts, plus one [default: 30].",
        ),
        click.option(
            "--prefill-delayer-token-usage-low-watermark",
            type=click.FloatRange(0, 1),
            default=None,
            help="SGLang: a rank below this KV usage lets prefill through at once [default: off].",
        ),
        click.option(
            "--prefill-schedule-interval",
            type=click.IntRange(min=1),
            default=None,
            help="vLLM: ranks with decodes prefill only every Nth step, the same steps on every rank (vLLM PR #44558 "
            "found 2 best) [default: 1, off].",
        ),
    ]


def _batching_options() -> list[Callable[[F], F]]:
    """Batch formation (:attr:`gateway.sim.calibration.EngineModelConfig.batching`) and FairBatching's SLOs."""
    return [
        click.option(
            "--batching",
            type=click.Choice(["default", "stall-free", "fairbatching"]),
            default="default",
            show_default=True,
            help="Batch formation: the engine's own, Sarathi's stall-free (decodes first, then prefill in one token "
            "budget), or FairBatching (a time budget from the requests' slack; idealised admission only).",
        ),
        click.option(
            "--ttft-slo",
            type=click.FloatRange(min=0, min_open=True),
            default=2.0,
            show_default=True,
            help="FairBatching's TTFT objective, seconds.",
        ),
        click.option(
            "--tpot-slo",
            type=click.FloatRange(min=0, min_open=True),
            default=0.1,
            show_default=True,
            help="FairBatching's TPOT objective, seconds.",
        ),
    ]


def _prefill_rate_option() -> Callable[[F], F]:
    """``--prefill-rate``: the engine's prefill rescaled (:meth:`EngineModelConfig.with_prefill_rate`)."""
    return click.option(
        "--prefill-rate",
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        help="Rescale prefill to this many prompt tokens/s per GPU at the calibration point (DeepSeek's profile "
        f"figure is 7.8k; production about {PRODUCTION_PREFILL_TOKENS_PER_S:,.0f}) [default: 7.8k].",
    )


def simulate_engine_options(f: F) -> F:
    """Add the prefill rate, the engines' own prefill alignment (SGLang's delayer as ``--engine-prefill-delayer``)
    and the batch formation to ``gateway simulate``."""
    decorators = [_prefill_rate_option(), *_alignment_options("--engine-prefill-delayer"), *_batching_options()]
    for decorator in reversed(decorators):
        f = decorator(f)
    return f


def engine_flag_options(f: F) -> F:
    """Add the SGLang and vLLM flags the engine model reads (see :data:`ENGINE_FLAGS`)."""
    positive = click.IntRange(min=1)
    decorators = [
        click.option(
            "--chunked-prefill-size",
            type=positive,
            default=None,
            help="SGLang: prefill tokens per step for the DP group; a rank takes it over the DP size [default: 8192].",
        ),
        click.option(
            "--max-running-requests",
            type=positive,
            default=None,
            help="SGLang: running requests for the DP group, divided over the ranks [default: from the KV size].",
        ),
        click.option(
            "--enable-mixed-chunk", is_flag=True, help="SGLang: decode the running requests in prefill steps."
        ),
        click.option(
            "--schedule-conservativeness",
            type=click.FloatRange(min=0, min_open=True),
            default=1.0,
            show_default=True,
            help="SGLang: scales the new-token ratio of admission (x 0.3 under DP attention).",
        ),
        click.option("--disable-overlap-schedule", is_flag=True, help="SGLang: no overlap scheduler (no join lag)."),
        click.option(
            "--max-num-batched-tokens",
            type=positive,
            default=None,
            help="vLLM: token budget per step per DP rank, decode tokens included [default: 8192].",
        ),
        click.option(
            "--max-num-seqs", type=positive, default=None, help="vLLM: running requests per DP rank [default: 1024]."
        ),
        click.option(
            "--async-scheduling/--no-async-scheduling",
            default=True,
            show_default=True,
            help="vLLM: schedule one step ahead (a request joins the step after next).",
        ),
        click.option("--disable-radix-cache", is_flag=True, help="SGLang: no prefix cache (radix cache)."),
        click.option(
            "--enable-prefix-caching/--no-enable-prefix-caching",
            default=True,
            show_default=True,
            help="vLLM: a prefix cache per DP rank.",
        ),
        *_alignment_options("--enable-prefill-delayer"),
        *_batching_options(),
        _prefill_rate_option(),
    ]
    for decorator in reversed(decorators):
        f = decorator(f)
    return f


def engine_model_config(
    profile: Profile,
    flavor: str,
    dp_size: int,
    prefill_rate: float | None,
    *,
    batching: str = "default",
    ttft_slo: float = 2.0,
    tpot_slo: float = 0.1,
    **flags: Any,
) -> EngineModelConfig:
    """The engine model for ``profile``, the engine flags given on the command line and the batch formation
    (``stall-free`` or ``fairbatching`` with its TTFT and TPOT objectives, seconds; any profile whose admission
    allows it).

    Raises:
        click.UsageError: an engine flag with the idealised profile, a flag of the other engine, or SGLang's
            prefill delayer without its overlap scheduler (SGLang refuses it too), or a batch formation the
            profile's admission cannot run.
    """
    defaults = {
        "enable_mixed_chunk": False,
        "schedule_conservativeness": 1.0,
        "disable_overlap_schedule": False,
        "async_scheduling": True,
        "disable_radix_cache": False,
        "enable_prefix_caching": True,
        "enable_prefill_delayer": False,
    }
    given = {k: v for k, v in flags.items() if v is not None and v != defaults.get(k)}
    if profile == "idealised":
        if given:
            names = ", ".join(ENGINE_FLAGS[k][0] for k in sorted(given))
            raise click.UsageError(f"{names} apply with --profile as-shipped only")
        config = EngineModelConfig()
    else:
        wrong = [ENGINE_FLAGS[k][0] for k in sorted(given) if ENGINE_FLAGS[k][1] != flavor]
        if wrong:
            raise click.UsageError(f"{', '.join(wrong)} are not {flavor} flags")
        if given.get("enable_prefill_delayer") and given.get("disable_overlap_schedule"):
            raise click.UsageError("SGLang's prefill delayer needs the overlap scheduler (--disable-overlap-schedule)")
        alignment = {k: given.pop(k) for k in ALIGNMENT_FLAGS if k in given}
        shipped = {k: v for k, v in flags.items() if k not in ALIGNMENT_FLAGS}
        config = replace(EngineModelConfig.as_shipped(flavor, dp_size, **shipped), **alignment)  # type: ignore[arg-type]
    try:
        config = replace(config, batching=batching.replace("-", "_"), ttft_slo_s=ttft_slo, tpot_slo_s=tpot_slo)  # type: ignore[arg-type]
    except ValueError as exc:
        raise click.UsageError(f"--batching {batching}: {exc}") from exc
    return config.with_prefill_rate(prefill_rate) if prefill_rate is not None else config
