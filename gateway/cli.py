"""The ``gateway`` command line: ``serve``, ``mock-engine``, ``bench``, ``simulate`` and ``stack``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from typing import Any, Literal, get_args

import click
import uvicorn

from gateway.config import ConfigError, PolicyName, Settings, load_settings
from gateway.logs import configure_logging

log = logging.getLogger(__name__)

LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"])
POLICIES = click.Choice(get_args(PolicyName))

trace_option = click.option(
    "--trace",
    required=True,
    help="Trace file (Azure 2023 CSV or Mooncake JSONL) or a bundled name: azure-conv, azure-code, mooncake-conv.",
)
rate_scale_option = click.option(
    "--rate-scale",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Divide the trace's inter-arrival times by this factor.",
)
output_option = click.option(
    "--output", type=click.Path(dir_okay=False), default=None, help="Write the figures as JSON here."
)
plot_option = click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also draw TTFT, TPOT and end-to-end latency percentiles as a PNG here (needs matplotlib: the "
    "`bench` extra, pip install 'sbs-gateway[bench]').",
)
no_progress_option = click.option("--no-progress", is_flag=True, help="Do not show a progress bar (on stderr).")
log_level_option = click.option(
    "--log-level", type=LOG_LEVELS, default="info", show_default=True, help="Logging threshold (stderr)."
)


def _check_plot(plot: str | None) -> None:
    """Fail before a long run if --plot was given and matplotlib is missing."""
    if plot is not None:
        from gateway.plots import PlotUnavailableError, require_matplotlib

        try:
            require_matplotlib()
        except PlotUnavailableError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="sbs-gateway")
def main() -> None:
    """OpenAI-compatible routing gateway with staggered batch scheduling over SGLang/vLLM DP ranks.

    \b
    Quick start:
      gateway serve                                    embedded simulated engines, http://127.0.0.1:8000/v1
      gateway serve --config gateway.yaml              in front of your SGLang/vLLM engines
      gateway stack                                    engines + gateway + Prometheus on loopback (from a clone)
      gateway bench --url http://127.0.0.1:8000 --trace azure-conv --duration 60
      gateway simulate --trace azure-conv --duration 600 --plot policies.png

    Every command's options: gateway COMMAND --help. Settings: README "Configuration reference".
    """


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    envvar="GATEWAY_CONFIG",
    help="YAML configuration file (also GATEWAY_CONFIG). Without one, simulated engines start in-process.",
)
@click.option("--host", default=None, help="Address to listen on [default: 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port to listen on [default: 8000].")
@click.option(
    "--policy",
    type=POLICIES,
    default=None,
    help="Scheduling policy, overriding the configuration [default: sbs].",
)
@log_level_option
@click.option(
    "--log-format",
    type=click.Choice(["json", "text"]),
    default=None,
    help="Log lines as JSON objects (request id, engine, rank, window, timings as fields) or as text "
    "[default: text; setting log.format].",
)
@click.option(
    "--api-keys-file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="File of API keys, one a line ('#' comments): clients must send 'Authorization: Bearer <key>' on /v1. "
    "Also setting security.api_keys_file; keys themselves via GATEWAY_SECURITY__API_KEYS='[...]'.",
)
@click.option(
    "--admin-keys-file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="File of admin keys, one a line, for /admin/state, /docs, /openapi.json (and /metrics with "
    "security.metrics_auth: admin).",
)
def serve(
    config_path: str | None,
    host: str | None,
    port: int | None,
    policy: str | None,
    log_level: str,
    log_format: str | None,
    api_keys_file: str | None,
    admin_keys_file: str | None,
) -> None:
    """Run the gateway.

    With no configuration (no --config, no GATEWAY_CONFIG, no GATEWAY_ENGINES) it starts two simulated engines
    in-process (SGLang- and vLLM-flavoured, 8 DP ranks each, model deepseek-v3), so the OpenAI endpoint answers
    at once.
    """
    security = {"api_keys_file": api_keys_file, "admin_keys_file": admin_keys_file}
    try:
        settings = load_settings(
            config_path,
            host=host,
            port=port,
            policy=policy,
            log={"format": log_format} if log_format else None,
            security={k: v for k, v in security.items() if v} or None,
        )
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    configure_logging(log_level, settings.log.format)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(settings, log_level))


async def _serve(settings: Settings, log_level: str) -> None:
    from gateway.embedded import embedded_engines
    from gateway.server.app import begin_drain, create_app
    from gateway.serving import DrainingServer

    async with contextlib.AsyncExitStack() as stack:
        if not settings.engines:
            engines = await stack.enter_async_context(embedded_engines(settings.embedded_speed))
            settings = settings.model_copy(update={"engines": engines})
            for engine in engines:
                log.info(
                    "embedded %s engine %s: %s (%d DP ranks)", engine.flavor, engine.name, engine.url, engine.dp_size
                )
        try:
            app = create_app(settings)
        except OSError as exc:
            raise click.ClickException(f"cannot read the API keys: {exc}") from exc
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=log_level,
            log_config=None,  # keep configure_logging's format for uvicorn's own lines
            access_log=False,  # the gateway writes its own access log (gateway.access), with request ids
            timeout_graceful_shutdown=settings.shutdown.drain_timeout_s,
        )
        log.info(
            "gateway (%s) on http://%s:%d/v1 serving %s",
            settings.policy,
            settings.host,
            settings.port,
            ", ".join(settings.served_models()),
        )
        await DrainingServer(config, on_drain=lambda: begin_drain(app)).serve()


@main.command("mock-engine")
@click.option("--flavor", type=click.Choice(["sglang", "vllm"]), required=True, help="Engine API to imitate.")
@click.option("--dp-size", type=click.IntRange(min=1), default=8, show_default=True, help="DP ranks.")
@click.option("--port", type=click.IntRange(0, 65535), required=True, help="Port to listen on.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--model", default="deepseek-v3", show_default=True, help="Served model name.")
@click.option(
    "--speed",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Engine clock speed: X times real time (below 1 is slower).",
)
def mock_engine(flavor: str, dp_size: int, port: int, host: str, model: str, speed: float) -> None:
    """Run a simulated DP+EP engine (DeepSeek-V3/H800 timing model) with SGLang's or vLLM's HTTP API."""
    from gateway.sim.mock_engine.app import MockEngineConfig, serve_mock_engine

    config = MockEngineConfig(flavor=flavor, dp_size=dp_size, model=model, speed=speed)  # type: ignore[arg-type]
    click.echo(f"simulated {flavor} engine, {dp_size} DP ranks, model {model}, on http://{host}:{port}", err=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_mock_engine(config, host, port))


@main.command()
@click.option("--url", required=True, help="Gateway (or engine) base URL, e.g. http://127.0.0.1:8000.")
@trace_option
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Stop sending after this many seconds of wall time, then wait for what is in flight.",
)
@rate_scale_option
@output_option
@click.option("--model", default=None, help="Model to request [default: the first of GET /v1/models].")
@click.option(
    "--endpoint",
    type=click.Choice(["chat", "completions"]),
    default="chat",
    show_default=True,
    help="OpenAI API to call: /v1/chat/completions or /v1/completions.",
)
@click.option("--max-requests", type=click.IntRange(min=1), default=None, help="Send at most this many requests.")
@plot_option
@no_progress_option
def bench(
    url: str,
    trace: str,
    duration: float | None,
    rate_scale: float,
    output: str | None,
    model: str | None,
    endpoint: Literal["chat", "completions"],
    max_requests: int | None,
    plot: str | None,
    no_progress: bool,
) -> None:
    """Replay a production trace against a gateway: streaming requests at the trace's arrival times.

    Every request asks for exactly the trace's output length (ignore_eos), with a prompt of the trace's length.
    Prints TTFT, TPOT, ITL and end-to-end percentiles, throughput and failures; --output keeps them as JSON,
    --plot as a PNG. Works against any OpenAI-compatible server (an engine, another router).

    \b
    Example (the local stack's gateway, 5 minutes of Azure conversation at twice its rate):
      gateway bench --url http://127.0.0.1:8000 --trace azure-conv --duration 300 --rate-scale 2 \\
        --output bench.json --plot bench.png
    """
    from gateway.replay.client import ReplayError, run_bench

    _check_plot(plot)
    try:
        summary = run_bench(
            url,
            trace,
            duration_s=duration,
            rate_scale=rate_scale,
            output=output,
            model=model,
            endpoint=endpoint,
            max_requests=max_requests,
            progress=not no_progress,
        )
    except (OSError, ValueError, ReplayError) as exc:
        raise click.ClickException(str(exc)) from exc
    if plot is not None:
        _write_plot({summary["config"]["model"] or "bench": summary}, plot, f"gateway bench: {trace} against {url}")


def _write_plot(summaries: dict[str, Any], plot: str, title: str) -> None:
    from gateway.plots import PlotUnavailableError, plot_summaries

    try:
        plot_summaries(summaries, plot, title)
    except (PlotUnavailableError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {plot}", err=True)


@main.command()
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
    output: str | None,
    plot: str | None,
    no_progress: bool,
) -> None:
    """Replay a trace through the scheduler and simulated engines in virtual time (no HTTP), per policy.

    The gateway's own scheduler, window and load view drive the same engine model the mock engines run, on a
    virtual clock: an hour of trace takes seconds, deterministically from --seed. Prints one line per policy
    (TTFT, TPOT, output throughput); --output keeps every figure as JSON, --plot draws them as a PNG.

    \b
    Example (every immediate-dispatch baseline against sbs, 10 minutes of trace):
      gateway simulate --trace azure-conv --duration 600 --policy sbs --policy round_robin \\
        --policy least_tokens --policy power_of_two --plot policies.png
    """
    import json
    import time

    from tqdm import tqdm

    from gateway.sim.simulate import SimConfig, Slo, derived_slo
    from gateway.sim.simulate import simulate as run_simulation
    from gateway.workload.traces import load_trace, rescale, resolve_trace, window

    try:
        requests = rescale(window(load_trace(resolve_trace(trace)), 0.0, duration), rate_scale)
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    _check_plot(plot)
    try:
        scheduling = load_settings(config_path) if config_path else SimConfig()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    results = {}
    slo = Slo()
    if slo_scale is not None and requests:
        slo = derived_slo(requests, SimConfig().engine, slo_scale)
    for policy in policies or ("sbs", "round_robin"):
        started = time.perf_counter()
        config = SimConfig(
            policy=policy,
            instances=instances,
            dp_size=dp_size,
            seed=seed,
            scrape_interval_s=scrape_interval,
            scrape_lag_s=scrape_lag,
            window=scheduling.window,
            allocator=scheduling.allocator,
            decode=scheduling.decode,
        )
        bar = tqdm(total=len(requests), desc=policy, unit="req", file=sys.stderr, disable=no_progress, leave=False)
        with bar:
            summary = run_simulation(requests, config, on_done=bar.update).summary(slo)
        summary["wall_s"] = time.perf_counter() - started
        results[policy] = summary
        ttft, tpot = summary["ttft_s"], summary["tpot_s"]
        click.echo(
            f"{policy:<15} completed {summary['completed']:>6}  TTFT p50 {ttft['p50']:.3f} s  p99 {ttft['p99']:.3f} s  "
            f"TPOT mean {tpot['mean'] * 1000:.1f} ms  output {summary['output_throughput_tok_s']:.0f} tok/s  "
            f"({summary['wall_s']:.1f} s wall)"
        )
    if output:
        with open(output, "w") as f:
            json.dump(results, f, indent=2)
    if plot is not None:
        _write_plot(results, plot, f"gateway simulate: {trace}, {instances} x {dp_size} DP ranks, virtual time")


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default="deploy/compose/gateway.yaml",
    show_default=True,
    help="Gateway configuration whose engines to simulate (docker-compose.yml's, from the repository root).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback address every part listens on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Gateway port (0: free).")
@click.option("--policy", type=POLICIES, default=None, help="Scheduling policy, overriding the configuration.")
@click.option(
    "--prometheus/--no-prometheus",
    default=None,
    help="Start Prometheus (Debian package `prometheus`) [default: when it is installed].",
)
@click.option(
    "--prometheus-config",
    type=click.Path(dir_okay=False),
    default="deploy/prometheus/prometheus.yml",
    show_default=True,
    help="docker-compose's Prometheus configuration; its targets are moved to the local processes.",
)
@click.option(
    "--prometheus-port",
    type=click.IntRange(0, 65535),
    default=9090,
    show_default=True,
    help="Prometheus port (0: a free one).",
)
@click.option(
    "--scrape-interval",
    type=click.FloatRange(min=0.1),
    default=None,
    help="Prometheus scrape and rule evaluation interval in seconds [default: the configuration's].",
)
@click.option(
    "--engine-speed",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Simulated engines' clock: X times real time (below 1 is slower).",
)
@click.option("--log-level", type=LOG_LEVELS, default="warning", show_default=True, help="Logging threshold (stderr).")
def stack(
    config_path: str,
    host: str,
    port: int,
    policy: str | None,
    prometheus: bool | None,
    prometheus_config: str,
    prometheus_port: int,
    scrape_interval: float | None,
    engine_speed: float,
    log_level: str,
) -> None:
    """Run the docker-compose stack without Docker, on loopback, until Ctrl-C.

    Starts a simulated engine for every engine of --config (its flavour, DP size and model, on a free port), the
    gateway in front of them, and Prometheus with the rules and alerts of deploy/prometheus scraping all of them.
    Run it from the repository root; Grafana is not started (import deploy/grafana/dashboards into yours).
    """
    from pathlib import Path

    if not Path(config_path).is_file():
        raise click.ClickException(
            f"{config_path} not found: run gateway stack from the repository root, or pass --config"
        )
    try:
        settings = load_settings(config_path, host=host, port=port, policy=policy)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    configure_logging(log_level, settings.log.format)
    if prometheus is None:
        import shutil

        prometheus = shutil.which("prometheus") is not None and Path(prometheus_config).is_file()
        if not prometheus:
            click.echo("prometheus is not installed (or no --prometheus-config): starting without it", err=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            _stack(
                settings,
                engine_speed=engine_speed,
                prometheus_config=Path(prometheus_config) if prometheus else None,
                prometheus_port=prometheus_port,
                scrape_interval_s=scrape_interval,
            )
        )


async def _stack(settings: Settings, **options: Any) -> None:
    import signal

    from gateway.stack import StackError, running_stack

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with running_stack(settings, announce=lambda line: click.echo(line, err=True), **options):
            click.echo("stack ready; Ctrl-C stops it", err=True)
            await stop.wait()
            click.echo("stopping", err=True)
    except StackError as exc:
        raise click.ClickException(str(exc)) from exc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
