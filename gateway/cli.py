"""The ``gateway`` command line: ``serve``, ``mock-engine`` and ``bench``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from typing import Literal, get_args

import click
import uvicorn

from gateway.config import ConfigError, PolicyName, Settings, load_settings

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


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="sbs-gateway")
def main() -> None:
    """OpenAI-compatible routing gateway with staggered batch scheduling over SGLang/vLLM DP ranks."""


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
@click.option("--log-level", type=LOG_LEVELS, default="info", show_default=True)
def serve(config_path: str | None, host: str | None, port: int | None, policy: str | None, log_level: str) -> None:
    """Run the gateway.

    With no configuration (no --config, no GATEWAY_CONFIG, no GATEWAY_ENGINES) it starts two simulated engines
    in-process (SGLang- and vLLM-flavoured, 8 DP ranks each, model deepseek-v3), so the OpenAI endpoint answers
    at once.
    """
    _setup_logging(log_level)
    try:
        settings = load_settings(config_path, host=host, port=port, policy=policy)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(settings, log_level))


async def _serve(settings: Settings, log_level: str) -> None:
    from gateway.embedded import embedded_engines
    from gateway.server.app import create_app

    async with contextlib.AsyncExitStack() as stack:
        if not settings.engines:
            engines = await stack.enter_async_context(embedded_engines(settings.embedded_speed))
            settings = settings.model_copy(update={"engines": engines})
            for engine in engines:
                click.echo(
                    f"embedded {engine.flavor} engine {engine.name}: {engine.url} ({engine.dp_size} DP ranks)", err=True
                )
        app = create_app(settings)
        config = uvicorn.Config(
            app, host=settings.host, port=settings.port, log_level=log_level, timeout_graceful_shutdown=10
        )
        click.echo(
            f"gateway ({settings.policy}) on http://{settings.host}:{settings.port}/v1 "
            f"serving {', '.join(settings.served_models())}",
            err=True,
        )
        await uvicorn.Server(config).serve()


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
    from gateway.sim.mock_engine import MockEngineConfig, serve_mock_engine

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
@click.option("--endpoint", type=click.Choice(["chat", "completions"]), default="chat", show_default=True)
@click.option("--max-requests", type=click.IntRange(min=1), default=None, help="Send at most this many requests.")
@click.option("--no-progress", is_flag=True, help="Do not show a progress bar.")
def bench(
    url: str,
    trace: str,
    duration: float | None,
    rate_scale: float,
    output: str | None,
    model: str | None,
    endpoint: Literal["chat", "completions"],
    max_requests: int | None,
    no_progress: bool,
) -> None:
    """Replay a production trace against a gateway: streaming requests at the trace's arrival times."""
    from gateway.replay.client import ReplayError, run_bench

    try:
        run_bench(
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
@output_option
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
    output: str | None,
) -> None:
    """Replay a trace through the scheduler and simulated engines in virtual time (no HTTP), per policy."""
    import json
    import time

    from gateway.replay.traces import load_trace, rescale, resolve_trace, window
    from gateway.sim.simulate import SimConfig, Slo, derived_slo
    from gateway.sim.simulate import simulate as run_simulation

    try:
        requests = rescale(window(load_trace(resolve_trace(trace)), 0.0, duration), rate_scale)
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    results = {}
    slo = Slo()
    if slo_scale is not None and requests:
        slo = derived_slo(requests, SimConfig().engine, slo_scale)
    for policy in policies or ("sbs", "round_robin"):
        started = time.perf_counter()
        config = SimConfig(
            policy=policy,  # type: ignore[arg-type]
            instances=instances,
            dp_size=dp_size,
            seed=seed,
            scrape_interval_s=scrape_interval,
            scrape_lag_s=scrape_lag,
        )
        summary = run_simulation(requests, config).summary(slo)
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
