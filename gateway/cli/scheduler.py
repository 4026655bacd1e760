"""``gateway scheduler``: the scheduler service front doors share (:mod:`gateway.scheduler_service.service`)."""

from __future__ import annotations

import click

from gateway import serving
from gateway.cli.options import config_option, log_level_option, policy_option
from gateway.config import ConfigError, load_settings
from gateway.logs import configure_logging


@click.command()
@config_option(envvar="GATEWAY_CONFIG", help="YAML configuration file (also GATEWAY_CONFIG); it must list the engines.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (TCP).")
@click.option("--port", type=int, default=9000, show_default=True, help="Port to listen on (TCP).")
@click.option(
    "--unix-socket",
    type=click.Path(dir_okay=False),
    default=None,
    help="Listen on this Unix socket instead of TCP (front doors then use url: unix:PATH).",
)
@policy_option("Scheduling policy, overriding the configuration [default: sbs].")
@log_level_option("info")
def scheduler(
    config_path: str | None, host: str, port: int, unix_socket: str | None, policy: str | None, log_level: str
) -> None:
    """Run the scheduler service: the window, the allocator, the load view and the engine scrapers that several
    front doors (gateway serve with scheduler_service.url set) consult per request.

    Every front door and the service read the same configuration (engines, policy, window, allocator); each
    front door keeps scraping the engines, so it schedules alone at once when the service is down. SIGHUP reloads the
    configuration file's engines (send it to the front doors too).
    """
    import os

    from gateway.scheduler_service.supervisor import serve_scheduler
    from gateway.server.reload import ConfigSource, defer_sighup

    try:
        settings = load_settings(config_path, policy=policy)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    if not settings.engines:
        raise click.UsageError("gateway scheduler needs the engines in its configuration (engines: [...])")
    configure_logging(log_level, settings.log.format)
    path = config_path or os.environ.get("GATEWAY_CONFIG")
    source = ConfigSource(path, {"policy": policy}) if path else None
    defer_sighup()  # a SIGHUP while the service starts is reloaded once it serves, not the end of the process
    serving.run(serve_scheduler(settings, host=host, port=port, unix_path=unix_socket, source=source))
