"""``gateway simulate``: policies side by side on a trace, in virtual time (:mod:`gateway.sim.compare`)."""

from __future__ import annotations

import click

from gateway.cli.engine_options import simulate_engine_options
from gateway.cli.options import (
    POLICIES,
    check_plot,
    no_progress_option,
    output_option,
    plot_option,
    rate_scale_option,
    trace_option,
    write_plot,
)
from gateway.config import ConfigError, load_settings
from gateway.scheduling.baselines import IMMEDIATE_POLICIES


def parse_pool(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    """``INSTANCESxDP`` (e.g. ``2x8``) as ``(instances, dp_size)``, both >= 1."""
    if value is None:
        return None
    parts = value.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise click.BadParameter(f"expected INSTANCESxDP with both >= 1 (e.g. 2x8), got {value!r}")
    return int(parts[0]), int(parts[1])


@click.command()
@trace_option
@click.option(
    "--policy",
    "policies",
    multiple=True,
    type=POLICIES,
    help="Policy to simulate; repeat to compare several [default: sbs and round_robin].",
)
@click.option("--instances", type=click.IntRange(min=1), default=2, show_default=True, help="Engine instances.")
@click.option("--dp-size", type=click.IntRange(min=1), default=8, show_default=True, help="DP ranks per instance.")
@rate_scale_option
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds of the trace (its own clock) to replay [default: all].",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of randomised policies.")
@click.option(
    "--scrape-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=0.5,
    show_default=True,
    help="Seconds between two scrapes of an engine's metrics.",
)
@click.option(
    "--scrape-lag",
    type=click.FloatRange(min=0),
    default=0.05,
    show_default=True,
    help="Age of the scraped figures when the gateway gets them, seconds.",
)
@click.option(
    "--slo-scale",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Judge SLO attainment against the SLO derived from the engine model with this scale "
    "(gateway.sim.simulate.derived_slo) [default: TTFT <= 2 s, TPOT <= 100 ms].",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Gateway configuration (YAML, as for serve) whose window, allocator and decode sections sbs runs with "
    "[default: the defaults].",
)
@click.option(
    "--estimate-error",
    default="none",
    show_default=True,
    help="The gateway sees a prompt-token estimate while the engines process the trace's count: with the error "
    "measured against DeepSeek-V3's tokenizer on a kind of text (measured, prose, code, chat, chinese, "
    "multilingual; measured = chat, with its template; bench/results/token_estimate_error.md), or a lognormal "
    "true/estimate ratio given as MU,SIGMA of its log (0,0.3); none gives the gateway the exact count.",
)
@click.option(
    "--nonstream-share",
    type=click.FloatRange(min=0, max=1),
    default=0.0,
    show_default=True,
    help="Fraction of requests not streamed: the gateway sees no first token of theirs, only their finish.",
)
@click.option(
    "--dispatch-latency-ms",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="One-way latency between gateway and engine, milliseconds (requests out, tokens and finishes back).",
)
@click.option(
    "--dispatch-jitter-ms",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Extra one-way delay per request and direction, uniform in [0, this], milliseconds.",
)
@click.option(
    "--engine-profile",
    type=click.Choice(["idealised", "as-shipped"]),
    default="idealised",
    show_default=True,
    help="Engine model: idealised, or the engine as shipped with its defaults (gateway.sim.calibration).",
)
@click.option(
    "--engine-flavor",
    type=click.Choice(["sglang", "vllm"]),
    default="sglang",
    show_default=True,
    help="Whose defaults and step rules --engine-profile as-shipped follows.",
)
@click.option(
    "--preset",
    type=click.Choice(
        ["idealised", "realistic-sglang", "realistic-sglang-aligned", "realistic-vllm", "realistic-vllm-aligned"]
    ),
    default=None,
    help="A named engine model and information limits in one (gateway.sim.presets) [realistic-sglang when no "
    "engine or information-limit option is given]: realistic-* is the engine "
    "as shipped, the measured estimate error, 30% not streamed and 2 ms + up to 1 ms dispatch latency; "
    "-aligned adds the engine's own prefill alignment (SGLang --enable-prefill-delayer, vLLM "
    "--prefill-schedule-interval 2); replaces --engine-profile/--engine-flavor and the information-limit "
    "options, and prints its settings.",
)
@click.option(
    "--prefill-only",
    is_flag=True,
    help="Prefill-only instances (the P/D setting): every output is one token, so nothing decodes.",
)
@click.option(
    "--prefill-pool",
    callback=parse_pool,
    default=None,
    metavar="INSTANCESxDP",
    help="P/D disaggregation: the prefill pool, e.g. 2x8 (with --decode-pool; replaces --instances/--dp-size).",
)
@click.option(
    "--decode-pool",
    callback=parse_pool,
    default=None,
    metavar="INSTANCESxDP",
    help="P/D disaggregation: the decode pool, e.g. 1x16 (with --prefill-pool).",
)
@click.option(
    "--kv-connector",
    type=click.Choice(["sglang", "vllm"]),
    default=None,
    help="P/D handoff: SGLang's bootstrap protocol or vLLM's NixlConnector [default: the engine's flavour].",
)
@click.option(
    "--prefill-policy",
    type=click.Choice([*IMMEDIATE_POLICIES, "follow_bootstrap_room"]),
    default=None,
    help="P/D: the prefill leg's own policy (pd.prefill_policy) [default: the policy simulated].",
)
@click.option(
    "--decode-policy",
    type=click.Choice(["sbs", *IMMEDIATE_POLICIES]),
    default=None,
    help="P/D: the decode leg's policy (pd.decode_policy), for every policy simulated [default: sbs under sbs, "
    "else the policy simulated].",
)
@click.option(
    "--front-doors",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Front doors behind a plain load balancer (gateway.sim.frontdoors): arrivals split at random among them.",
)
@click.option(
    "--sharing",
    type=click.Choice(["service", "shared-view", "independent"]),
    default=None,
    help="How the front doors share their view: one scheduler service consulted per request, a shared load view "
    "each front door publishes its dispatches, first tokens and finishes to, or nothing [default: independent].",
)
@click.option(
    "--sharing-latency-ms",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="service: one-way latency between a front door and the scheduler service; shared-view: delay before a "
    "front door's event reaches the others; milliseconds.",
)
@simulate_engine_options
@output_option
@plot_option
@no_progress_option
def simulate(
    trace: str,
    policies: tuple[str, ...],
    instances: int,
    dp_size: int,
    rate_scale: float,
    duration: float | None,
    seed: int,
    scrape_interval: float,
    scrape_lag: float,
    slo_scale: float | None,
    config_path: str | None,
    estimate_error: str,
    nonstream_share: float,
    dispatch_latency_ms: float,
    dispatch_jitter_ms: float,
    engine_profile: str,
    engine_flavor: str,
    prefill_rate: float | None,
    preset: str | None,
    prefill_only: bool,
    prefill_pool: tuple[int, int] | None,
    decode_pool: tuple[int, int] | None,
    kv_connector: str | None,
    prefill_policy: str | None,
    decode_policy: str | None,
    front_doors: int,
    sharing: str | None,
    sharing_latency_ms: float,
    enable_prefill_delayer: bool,
    prefill_delayer_max_delay_passes: int | None,
    prefill_delayer_token_usage_low_watermark: float | None,
    prefill_schedule_interval: int | None,
    batching: str,
    ttft_slo: float,
    tpot_slo: float,
    output: str | None,
    plot: str | None,
    no_progress: bool,
) -> None:
    """Replay a trace through the scheduler and simulated engines in virtual time (no HTTP), per policy.

    The gateway's own scheduler, window and load view drive the same engine model the mock engines run, on a
    virtual clock: an hour of trace takes seconds, deterministically from --seed. Prints one line per policy
    (TTFT, TPOT, output throughput); --output keeps every figure as JSON, --plot draws them as a PNG.

    By default it runs the preset realistic-sglang (gateway.sim.presets): SGLang as shipped on DP+EP instances and
    what a real gateway knows (the measured prompt-token estimate error, 30% of requests not streamed, 2 ms + up to
    1 ms dispatch latency), drawn per request from --seed. --preset names another (idealised: the model every
    figure before December 2026 used, where the gateway knows everything at once). Without --preset, any engine or
    information-limit option builds the run from the idealised model instead: --estimate-error, --nonstream-share
    and --dispatch-latency-ms/--dispatch-jitter-ms take information away (gateway.sim.information);
    --engine-profile as-shipped runs the engines with their shipped defaults and step rules; with it,
    --engine-prefill-delayer (SGLang) or --prefill-schedule-interval (vLLM) switches on the engine's own prefill
    alignment. --batching chooses the batch formation (stall-free, or FairBatching with --ttft-slo/--tpot-slo).

    \b
    Example (sbs against immediate-dispatch baselines, 10 minutes of trace, realistic-sglang):
      gateway simulate --trace azure-conv --duration 600 --policy sbs --policy round_robin \\
        --policy least_tokens --policy power_of_two --plot policies.png

    --prefill-pool and --decode-pool simulate P/D disaggregation (gateway.sim.pd_driver): prefill and decode pools,
    each request's KV handed over by --kv-connector's protocol, the prefill leg placed by the policy (or
    --prefill-policy) and the decode leg by --decode-policy.

    \b
    Example (P/D: two prefill instances of 8 ranks, one decode instance of 16, SGLang's bootstrap protocol):
      gateway simulate --trace azure-conv --duration 600 --prefill-pool 2x8 --decode-pool 1x16 \\
        --policy sbs --policy cache_aware --decode-policy least_load

    \b
    Example (the idealised model with only the information limits: estimated prompts, 30% not streamed, 2 ms +- 1 ms
    to the engines):
      gateway simulate --trace azure-conv --duration 600 --policy sbs --policy least_tokens \\
        --estimate-error measured --nonstream-share 0.3 --dispatch-latency-ms 2 --dispatch-jitter-ms 1
    """
    import json

    from gateway.cli.engine_options import engine_model_config
    from gateway.sim.compare import compare_policies, summary_line
    from gateway.sim.information import InformationLimits, parse_estimate_error
    from gateway.sim.simulate import SimConfig, Slo, derived_slo
    from gateway.workload.traces import load_trace, rescale, resolve_trace, window

    try:
        requests = rescale(window(load_trace(resolve_trace(trace)), 0.0, duration), rate_scale)
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if prefill_only:
        from gateway.sim.presets import prefill_only as prefill_only_trace

        requests = prefill_only_trace(requests)
    check_plot(plot)
    try:
        error = parse_estimate_error(estimate_error)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--estimate-error") from exc
    try:
        scheduling = load_settings(config_path) if config_path else SimConfig()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    given = {
        "--estimate-error": estimate_error != "none",
        "--nonstream-share": nonstream_share != 0,
        "--dispatch-latency-ms": dispatch_latency_ms != 0,
        "--dispatch-jitter-ms": dispatch_jitter_ms != 0,
        "--engine-profile": engine_profile != "idealised",
        "--engine-flavor": engine_flavor != "sglang",
        "--prefill-rate": prefill_rate is not None,
        "--engine-prefill-delayer": enable_prefill_delayer,
        "--prefill-delayer-max-delay-passes": prefill_delayer_max_delay_passes is not None,
        "--prefill-delayer-token-usage-low-watermark": prefill_delayer_token_usage_low_watermark is not None,
        "--prefill-schedule-interval": prefill_schedule_interval not in (None, 1),
        "--batching": batching != "default",
    }
    if preset is not None and any(given.values()):
        raise click.UsageError(f"--preset replaces {', '.join(k for k, v in given.items() if v)}")
    if preset is None and not any(given.values()):
        from gateway.sim.presets import DEFAULT_PRESET

        preset = DEFAULT_PRESET
    try:
        engine = engine_model_config(
            engine_profile,  # type: ignore[arg-type]
            engine_flavor,
            dp_size,
            prefill_rate,
            enable_prefill_delayer=enable_prefill_delayer,
            prefill_delayer_max_delay_passes=prefill_delayer_max_delay_passes,
            prefill_delayer_token_usage_low_watermark=prefill_delayer_token_usage_low_watermark,
            prefill_schedule_interval=prefill_schedule_interval,
            batching=batching,
            ttft_slo=ttft_slo,
            tpot_slo=tpot_slo,
        )
    except click.UsageError as exc:
        raise click.UsageError(
            exc.message.replace("--enable-prefill-delayer", "--engine-prefill-delayer").replace(
                "--profile", "--engine-profile"
            )
        ) from exc
    if (prefill_pool is None) != (decode_pool is None):
        raise click.UsageError("--prefill-pool and --decode-pool go together")
    pd_options = {"--kv-connector": kv_connector, "--prefill-policy": prefill_policy, "--decode-policy": decode_policy}
    if prefill_pool is None and any(v is not None for v in pd_options.values()):
        raise click.UsageError(
            f"{', '.join(k for k, v in pd_options.items() if v is not None)} only apply with --prefill-pool"
        )
    if front_doors == 1 and (sharing is not None or sharing_latency_ms != 0):
        raise click.UsageError("--sharing and --sharing-latency-ms need --front-doors (more than 1)")
    if front_doors > 1 and prefill_pool is not None:
        raise click.UsageError("--front-doors is simulated on mixed instances only, not with --prefill-pool")
    slo = Slo()
    if slo_scale is not None and requests:
        slo = derived_slo(requests, engine, slo_scale)
    base = SimConfig(
        engine=engine,
        instances=instances,
        dp_size=dp_size,
        seed=seed,
        scrape_interval_s=scrape_interval,
        scrape_lag_s=scrape_lag,
        window=scheduling.window,
        allocator=scheduling.allocator,
        decode=scheduling.decode,
        limits=InformationLimits(
            estimate_error=error,
            nonstream_share=nonstream_share,
            dispatch_latency_s=dispatch_latency_ms / 1000,
            dispatch_jitter_s=dispatch_jitter_ms / 1000,
        ),
    )
    if preset is not None:
        from gateway.sim.presets import preset as named_preset

        chosen = named_preset(preset, dp_size if prefill_pool is None else prefill_pool[1])
        base = chosen.apply(base)
        if slo_scale is not None and requests:
            slo = derived_slo(requests, chosen.engine, slo_scale)
        click.echo(f"preset {chosen.describe()}")
    if prefill_pool is not None and decode_pool is not None:
        from dataclasses import replace

        from gateway.sim.pd_driver import PdPools
        from gateway.sim.presets import preset_flavor

        flavor = (None if preset is None else preset_flavor(preset)) or engine_flavor
        try:
            pools = PdPools(
                *prefill_pool,
                *decode_pool,
                connector=kv_connector or flavor,  # type: ignore[arg-type]
                prefill_policy=prefill_policy,
                decode_policy=decode_policy,
            )
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
        base = replace(base, pd=pools)
        instances, dp_size = prefill_pool
        click.echo(
            f"P/D: prefill {prefill_pool[0]} x {prefill_pool[1]}, decode {decode_pool[0]} x {decode_pool[1]} DP ranks, "
            f"{pools.connector} handoff"
        )
    if front_doors > 1:
        from dataclasses import replace

        from gateway.sim.frontdoors import FrontDoorConfig

        doors = FrontDoorConfig(front_doors, sharing or "independent", sharing_latency_ms / 1000)  # type: ignore[arg-type]
        base = replace(base, front_doors=doors)
        click.echo(doors.describe())
    results = compare_policies(
        requests,
        policies or ("sbs", "round_robin"),
        base,
        slo,
        progress=not no_progress,
        on_result=lambda policy, summary: click.echo(summary_line(policy, summary)),
    )
    if output:
        with open(output, "w") as f:
            json.dump(results, f, indent=2)
    if plot is not None:
        write_plot(results, plot, f"gateway simulate: {trace}, {instances} x {dp_size} DP ranks, virtual time")
