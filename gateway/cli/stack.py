"""``gateway stack``: the docker-compose stack without Docker, on loopback (:mod:`gateway.stack`)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import click

from gateway.cli.options import config_option, log_level_option, policy_option
from gateway.config import ConfigError, Settings, load_settings
from gateway.logs import configure_logging


@click.command()
@config_option(
    default="deploy/compose/gateway.yaml",
    show_default=True,
    help="Gateway configuration whose engines to simulate (docker-compose.yml's, from the repository root).",
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
@log_level_option("warning")
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
