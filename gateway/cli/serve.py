"""``gateway serve``: the gateway, in front of the configured engines or of the embedded simulated ones."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, cast

import click
import uvicorn

from gateway import serving
from gateway.cli.options import config_option, log_level_option, policy_option
from gateway.config import ConfigError, Settings, load_settings
from gateway.logs import configure_logging

if TYPE_CHECKING:
    from gateway.embedded import PdProtocol
    from gateway.server.reload import ConfigSource

log = logging.getLogger("gateway.cli")


@click.command()
@config_option(
    envvar="GATEWAY_CONFIG",
    help="YAML configuration file (also GATEWAY_CONFIG). Without one, simulated engines start in-process.",
)
@click.option("--host", default=None, help="Address to listen on [default: 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port to listen on [default: 8000].")
@policy_option("Scheduling policy, overriding the configuration [default: sbs].")
@log_level_option("info")
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
    "--pd",
    type=click.Choice(["sglang", "vllm-nixl", "vllm-mooncake"]),
    default=None,
    help="Embedded engines only: start a P/D disaggregated pair instead, a prefill engine (4 DP ranks) and a "
    "decode engine (8) speaking this protocol (SGLang's bootstrap, vLLM's NixlConnector or MooncakeConnector).",
)
@click.option(
    "--admin-keys-file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="File of admin keys, one a line, for /admin/state, /docs, /openapi.json (and /metrics with "
    "security.metrics_auth: admin).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Front-door processes on the port. Above 1 a scheduler service process is started too, which they "
    "consult per request (one scheduling view; each falls back to scheduling alone while it is down); dead "
    "processes are restarted. 1 runs the gateway in this process alone.",
)
def serve(
    config_path: str | None,
    host: str | None,
    port: int | None,
    policy: str | None,
    log_level: str,
    log_format: str | None,
    api_keys_file: str | None,
    pd: str | None,
    admin_keys_file: str | None,
    workers: int,
) -> None:
    """Run the gateway.

    With no configuration (no --config, no GATEWAY_CONFIG, no GATEWAY_ENGINES) it starts two simulated engines
    in-process (SGLang- and vLLM-flavoured, 8 DP ranks each, model deepseek-v3), so the OpenAI endpoint answers
    at once; --pd starts a prefill and a decode engine instead, serving deepseek-v3 disaggregated.
    """
    security = {"api_keys_file": api_keys_file, "admin_keys_file": admin_keys_file}
    overrides = {
        "host": host,
        "port": port,
        "policy": policy,
        "log": {"format": log_format} if log_format else None,
        "security": {k: v for k, v in security.items() if v} or None,
    }
    try:
        settings = load_settings(config_path, **overrides)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    from gateway.server.reload import ConfigSource, defer_sighup

    defer_sighup()  # a SIGHUP while the gateway starts is reloaded once it serves, not the end of the process
    path = config_path or os.environ.get("GATEWAY_CONFIG")
    source = ConfigSource(path, overrides) if path else None
    if pd is not None and settings.engines:
        raise click.UsageError("--pd chooses the embedded engines, but the configuration lists engines of its own")
    configure_logging(log_level, settings.log.format)
    if workers > 1:
        status = 0
        with contextlib.suppress(KeyboardInterrupt):  # before the supervisor's own signal handling is in place
            status = serving.run(_serve_workers(settings, log_level, cast("PdProtocol | None", pd), workers, source))
        if status:
            raise SystemExit(status)
        return
    with contextlib.suppress(KeyboardInterrupt):
        serving.run(_serve(settings, log_level, cast("PdProtocol | None", pd), source))


async def _serve_workers(
    settings: Settings, log_level: str, pd: PdProtocol | None, workers: int, source: ConfigSource | None
) -> int:
    from gateway.scheduler_service.supervisor import supervise

    async with contextlib.AsyncExitStack() as exits:
        embedded = not settings.engines and settings.discovery is None
        settings = await _with_engines(exits, settings, pd)
        return await supervise(settings, workers, log_level, source=source, embedded=embedded)


async def _with_engines(exits: contextlib.AsyncExitStack, settings: Settings, pd: PdProtocol | None) -> Settings:
    """``settings``, with the embedded simulated engines started in ``exits`` when it lists none."""
    from gateway.embedded import embedded_engines

    if not settings.engines and settings.discovery is None:
        engines = await exits.enter_async_context(embedded_engines(settings.embedded_speed, pd=pd))
        if pd is not None:  # the simulated decode engine reads KV from the prefill's over httpx: a line a request
            logging.getLogger("httpx").setLevel(logging.WARNING)
        settings = settings.model_copy(update={"engines": engines})
        for engine in engines:
            log.info(
                "embedded %s engine %s: %s (%d DP ranks)",
                engine.flavor if engine.role == "mixed" else f"{engine.flavor} {engine.role}",
                engine.name,
                engine.url,
                engine.dp_size,
            )
    return settings


async def _serve(
    settings: Settings, log_level: str, pd: PdProtocol | None = None, source: ConfigSource | None = None
) -> None:
    from gateway.server.app import begin_drain, create_app
    from gateway.server.reload import ReloadOnSignal
    from gateway.server.state import GatewayState
    from gateway.serving import DrainingServer

    async with contextlib.AsyncExitStack() as exits:
        embedded = not settings.engines and settings.discovery is None
        settings = await _with_engines(exits, settings, pd)
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

        def running_state() -> GatewayState | None:
            state = getattr(app.state, "gateway", None)
            return state if isinstance(state, GatewayState) else None

        with ReloadOnSignal(running_state, source, embedded=embedded):  # SIGHUP reloads the configuration file
            await DrainingServer(config, on_drain=lambda: begin_drain(app)).serve()
