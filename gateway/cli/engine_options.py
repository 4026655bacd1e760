"""The engine-model options of ``gateway mock-engine`` and ``gateway simulate``: a profile and the engines' own flags.

``--profile idealised`` (the default) is the engine model every figure so far was computed with; ``--profile
as-shipped`` is SGLang or vLLM as they ship (:meth:`gateway.sim.calibration.EngineModelConfig.as_shipped`), and only
then do the engines' own flags apply, each under the engine's own name.
"""

from __future__ import annotations

from collections.abc import Callable
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
}
"""Each engine flag: its parameter name, its command-line name and the engine that owns it."""


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
        click.option(
            "--prefill-rate",
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            help="Rescale prefill to this many prompt tokens/s per GPU at the calibration point (DeepSeek's profile "
            f"figure is 7.8k; production about {PRODUCTION_PREFILL_TOKENS_PER_S:,.0f}) [default: 7.8k].",
        ),
    ]
    for decorator in reversed(decorators):
        f = decorator(f)
    return f


def engine_model_config(
    profile: Profile, flavor: str, dp_size: int, prefill_rate: float | None, **flags: Any
) -> EngineModelConfig:
    """The engine model for ``profile`` and the engine flags given on the command line.

    Raises:
        click.UsageError: an engine flag with the idealised profile, or a flag of the other engine.
    """
    defaults = {
        "enable_mixed_chunk": False,
        "schedule_conservativeness": 1.0,
        "disable_overlap_schedule": False,
        "async_scheduling": True,
        "disable_radix_cache": False,
        "enable_prefix_caching": True,
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
        config = EngineModelConfig.as_shipped(flavor, dp_size, **flags)  # type: ignore[arg-type]
    return config.with_prefill_rate(prefill_rate) if prefill_rate is not None else config
