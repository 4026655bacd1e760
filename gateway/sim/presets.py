"""Named simulator presets: the engine model and the information limits a comparison runs under, in one name.

- ``idealised``: the defaults every figure before issue 13 was computed with: the idealised engine model
  (:class:`~gateway.sim.calibration.EngineModelConfig` ``()``) and a gateway that knows everything at once.
- ``realistic-sglang`` / ``realistic-vllm`` (:func:`realistic`): the engine as that flavour ships it
  (:meth:`EngineModelConfig.as_shipped` for the instance's DP size), the gateway's measured prompt-token estimate
  error (:data:`gateway.sim.information.MEASURED`), :data:`NONSTREAM_SHARE` of requests not streamed, and
  :data:`DISPATCH_LATENCY_S` plus up to :data:`DISPATCH_JITTER_S` each way between gateway and engine.
- ``realistic-sglang-aligned`` / ``realistic-vllm-aligned``: the same with the engine's own prefill alignment
  switched on (:data:`ALIGNMENT`): what a user can do instead of deploying a gateway.

A preset is applied to a :class:`~gateway.sim.simulate.SimConfig` (:meth:`Preset.apply`) and lists every setting
it implies (:meth:`Preset.settings`) so that a report can print them. Engine options that are not part of the
as-shipped profile yet join :func:`realistic` through ``engine_flags`` (passed to ``as_shipped`` under the
engine's own flag names), so a preset grows without a new signature.

Prefill-only instances (the SBS paper's P/D setting until P/D disaggregation exists) are a trace transform,
:func:`prefill_only`: every request's output becomes one token, so no request ever decodes and the decode pool
is left out; the analytic load (:mod:`gateway.sim.capacity`) and the derived SLO are then computed on the
transformed trace, as for any other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, get_args

from gateway.sim.calibration import EngineModelConfig
from gateway.sim.engine_defaults import EngineFlavor
from gateway.sim.information import InformationLimits, measured_estimate_error
from gateway.sim.simulate import SimConfig
from gateway.workload.traces import TraceRequest

NONSTREAM_SHARE = 0.3
"""Fraction of requests a realistic preset leaves unstreamed: issue 13's stated default (30%), the share at which
the 2026-12 evaluation review measured sbs's lead on Azure conv falling from -50% to -24%; not a measured traffic
mix."""

DISPATCH_LATENCY_S = 0.002
"""One-way latency between gateway and engine in a realistic preset, seconds: an assumed in-cluster figure (a
same-datacentre HTTP hop plus the engine's tokenizer), the value ``bench/results/information_limits.md`` ran."""

DISPATCH_JITTER_S = 0.001
"""Extra one-way delay per request and direction in a realistic preset, uniform in [0, this], seconds (assumed,
as :data:`DISPATCH_LATENCY_S`)."""

PresetName = str
"""A preset's name: one of :data:`PRESET_NAMES`."""

ALIGNMENT: dict[str, dict[str, Any]] = {
    "sglang": {"enable_prefill_delayer": True},
    "vllm": {"prefill_schedule_interval": 2},
}
"""The engine flags of each flavour's ``-aligned`` preset: SGLang's PrefillDelayer with its default options
(``--enable-prefill-delayer``) and vLLM's ``--prefill-schedule-interval 2`` (the value vLLM PR #44558 found best on
DeepSeek-R1 at DP 8)."""

PRESET_NAMES: tuple[str, ...] = (
    "idealised",
    *(f"realistic-{f}{s}" for f in get_args(EngineFlavor) for s in ("", "-aligned")),
)
"""The named presets, as ``gateway simulate --preset`` and the benches take them."""

DEFAULT_PRESET = "realistic-sglang"
"""The preset ``gateway simulate`` runs when given no preset and no engine or information-limit option."""


@dataclass(frozen=True)
class Preset:
    """An engine model and information limits under one name.

    Attributes:
        name: the preset's name (:data:`PRESET_NAMES`).
        engine: the engine model every instance runs.
        limits: what the gateway does not know, or knows late.
        engine_flags: the engine flags given to ``as_shipped`` beyond its defaults (empty for ``idealised``).
    """

    name: str
    engine: EngineModelConfig
    limits: InformationLimits
    engine_flags: Mapping[str, Any] = field(default_factory=dict)

    def apply(self, config: SimConfig) -> SimConfig:
        """``config`` with this preset's engine model and information limits (everything else kept)."""
        return replace(config, engine=self.engine, limits=self.limits)

    def settings(self) -> dict[str, Any]:
        """Every setting the preset implies, JSON-able: the engine model's fields (nested ones flattened by name)
        and the information limits."""
        engine = {k: v for k, v in vars(self.engine).items() if k != "new_token_ratio"}
        if self.engine.admission == "sglang":
            engine["new_token_ratio"] = vars(self.engine.new_token_ratio)
        error = self.limits.estimate_error
        return {
            "preset": self.name,
            "engine": engine,
            "engine_flags": dict(self.engine_flags),
            "estimate_error": None if error is None else {"mu": error.mu, "sigma": error.sigma},
            "nonstream_share": self.limits.nonstream_share,
            "dispatch_latency_s": self.limits.dispatch_latency_s,
            "dispatch_jitter_s": self.limits.dispatch_jitter_s,
            "stream_upstream": self.limits.stream_upstream,
        }

    def describe(self) -> str:
        """One line naming the settings that differ between presets (for a report's header)."""
        e, lim = self.engine, self.limits
        error = lim.estimate_error
        estimate = "exact prompt counts" if error is None else f"estimate error mu {error.mu:g} sigma {error.sigma:g}"
        flags = "".join(f", {k}={v}" for k, v in self.engine_flags.items())
        upstream = " (the gateway streams them from the engine)" if lim.stream_upstream and lim.nonstream_share else ""
        return (
            f"{self.name}: {e.step_composition} steps, {e.max_prefill_tokens_per_step:,} prefill tokens per rank per "
            f"step, join lag {e.join_lag_steps}, routed-expert share {e.routed_expert_fraction:.2f}, admission "
            f"{e.admission}, {e.max_running_requests:,} running requests per rank, all-to-all "
            f"{e.alltoall_s * 1000:.1f} ms{flags}; {estimate}, {lim.nonstream_share:.0%} not streamed"
            f"{upstream}, dispatch "
            f"{lim.dispatch_latency_s * 1000:g} ms + up to {lim.dispatch_jitter_s * 1000:g} ms"
        )


def idealised() -> Preset:
    """The simulator's defaults: idealised engine model, gateway that knows everything at once."""
    return Preset("idealised", EngineModelConfig(), InformationLimits())


def realistic(
    flavor: EngineFlavor,
    dp_size: int,
    *,
    nonstream_share: float = NONSTREAM_SHARE,
    dispatch_latency_s: float = DISPATCH_LATENCY_S,
    dispatch_jitter_s: float = DISPATCH_JITTER_S,
    estimate_error: str = "measured",
    engine_flags: Mapping[str, Any] | None = None,
    stream_upstream: bool = True,
) -> Preset:
    """The engine ``flavor`` as shipped on instances of ``dp_size`` ranks, and what a real gateway knows.

    Args:
        flavor: ``"sglang"`` or ``"vllm"``.
        dp_size: DP ranks per instance (sets SGLang's per-rank chunk and the all-to-all's EP size).
        nonstream_share: fraction 0-1 of requests not streamed.
        dispatch_latency_s: one-way gateway-engine latency, seconds.
        dispatch_jitter_s: extra one-way delay per request, uniform in [0, this], seconds.
        estimate_error: a kind of text of :func:`~gateway.sim.information.measured_estimate_error`
            (``measured`` = :data:`~gateway.sim.information.MEASURED`).
        engine_flags: the engine's own flags for ``EngineModelConfig.as_shipped`` (e.g.
            ``{"chunked_prefill_size": 16384}``); options the as-shipped profile gains later join here.
        stream_upstream: the gateway streams every request from the engine (its default,
            ``upstream.stream_nonstreamed``), so it sees the first tokens of the ``nonstream_share`` too.

    Raises:
        ValueError: an unknown flavour or kind of text, a flag of the other engine, or a limit out of range.
    """
    flags = dict(engine_flags or {})
    engine = EngineModelConfig.as_shipped(flavor, dp_size, **flags)
    name = f"realistic-{flavor}" + ("-aligned" if flags == ALIGNMENT[flavor] else "")
    limits = InformationLimits(
        estimate_error=measured_estimate_error(estimate_error),
        nonstream_share=nonstream_share,
        dispatch_latency_s=dispatch_latency_s,
        dispatch_jitter_s=dispatch_jitter_s,
        stream_upstream=stream_upstream,
    )
    return Preset(name, engine, limits, flags)


def preset_flavor(name: str) -> EngineFlavor | None:
    """Whose engine a realistic preset called ``name`` models (``realistic-vllm-aligned`` → ``"vllm"``); None for
    ``idealised``.

    Raises:
        ValueError: an unknown name; the message lists the names.
    """
    if name == "idealised":
        return None
    if name not in PRESET_NAMES:
        raise ValueError(f"unknown preset {name!r}; one of {list(PRESET_NAMES)}")
    flavor: EngineFlavor = name.removeprefix("realistic-").removesuffix("-aligned")  # type: ignore[assignment]
    return flavor


def preset(name: PresetName, dp_size: int) -> Preset:
    """The preset called ``name`` (:data:`PRESET_NAMES`) for instances of ``dp_size`` ranks, with its defaults.

    Raises:
        ValueError: an unknown name; the message lists the names.
    """
    flavor = preset_flavor(name)
    if flavor is None:
        return idealised()
    aligned = name.endswith("-aligned")
    return realistic(flavor, dp_size, engine_flags=ALIGNMENT[flavor] if aligned else None)


def prefill_only(trace: Sequence[TraceRequest]) -> list[TraceRequest]:
    """``trace`` as a prefill-only instance sees it: every output one token (the first, emitted by the step that
    ends the prefill), so nothing decodes; arrivals and prompts unchanged."""
    return [replace(r, output_tokens=1) for r in trace]
