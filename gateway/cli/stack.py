"""``gateway stack``: the docker-compose stack without Docker, on loopback (:mod:`gateway.stack`)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import click

from gateway.cli.options import config_option, log_level_option, policy_option
from gateway.config import ConfigError, Settings, load_settings
from gateway.logs import configure_logging

CONFIG = "deploy/compose/gateway.yaml"
"""docker-compose.yml's gateway configuration, from the repository root."""
PROMETHEUS_CONFIG = "deploy/prometheus/prometheus.yml"
"""docker-compose.yml's Prometheus configuration."""
PD_CONFIG = "deploy/compose/gateway-pd.yaml"
"""docker-compose.pd.yml's gateway configuration (``--pd``)."""
PD_PROMETHEUS_CONFIG = "deploy/prometheus/prometheus-pd.yml"
"""docker-compose.pd.yml's Prometheus configuration (``--pd``)."""


@click.command()
@click.option(
    "--pd",
    is_flag=True,
    help="Run docker-compose.pd.yml's stack instead: an SGLang prefill engine and decode engine serving "
    "deepseek-v3 disaggregated (--config and --prometheus-config default to its files).",
)
@config_option(
    default=None,
    help="Gateway configuration whose engines to simulate, from the repository root [default: docker-compose's, "
    f"{CONFIG}; with --pd {PD_CONFIG}].",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback address every part listens on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Gateway port (0: free).")
@policy_option()
@click.option(
    "--prometheus/--no-prometheus",
    default=None,
    help="Start Prometheus (Debian package `prometheus`) [default: when it is installed].",
)
@click.option(
    "--prometheus-config",
    type=click.Path(dir_okay=False),
    default=None,
    help="docker-compose's Prometheus configuration; its targets are moved to the local processes [default: "
    f"{PROMETHEUS_CONFIG}; with --pd {PD_PROMETHEUS_CONFIG}].",
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
@log_level_option("warning")
def stack(
    pd: bool,
    config_path: str | None,
    host: str,
    port: int,
    policy: str | None,
    prometheus: bool | None,
    prometheus_config: str | None,
    prometheus_port: int,
    scrape_interval: float | None,
    engine_speed: float,
    log_level: str,
) -> None:
    """Run the docker-compose stack without Docker, on loopback, until Ctrl-C.

    Starts a simulated engine for every engine of --config (its flavour, DP size, model and P/D role, on a free
    port), the gateway in front of them, and Prometheus with the rules and alerts of deploy/prometheus scraping all
    of them. --pd runs docker-compose.pd.yml's stack, a prefill and a decode engine. Run it from the repository
    root; Grafana is not started (import deploy/grafana/dashboards into yours).
    """
    from pathlib import Path

    config_path = config_path or (PD_CONFIG if pd else CONFIG)
    prometheus_config = prometheus_config or (PD_PROMETHEUS_CONFIG if pd else PROMETHEUS_CONFIG)
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
