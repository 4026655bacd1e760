"""``gateway mock-engine``: one simulated engine with SGLang's or vLLM's HTTP API."""

from __future__ import annotations

import asyncio
import contextlib

import click


@click.command("mock-engine")
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
