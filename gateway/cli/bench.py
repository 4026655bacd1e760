"""``gateway bench``: replay a production trace against a running gateway (or any OpenAI-compatible server)."""

from __future__ import annotations

from typing import Literal

import click

from gateway.cli.options import (
    check_plot,
    no_progress_option,
    output_option,
    plot_option,
    rate_scale_option,
    trace_option,
    write_plot,
)


@click.command()
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
@click.option(
    "--prompts",
    type=click.Choice(["estimate", "tokenizer"]),
    default="estimate",
    show_default=True,
    help="Whose count of each synthesised prompt is the trace's: the gateway's estimate (four characters a "
    "token), or DeepSeek-V3's tokenizer with its chat template (English prose, so the gateway's estimate is off as "
    "on real traffic).",
)
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
    prompts: Literal["estimate", "tokenizer"],
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

    check_plot(plot)
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
            prompts=prompts,
        )
    except (OSError, ValueError, ReplayError) as exc:
        raise click.ClickException(str(exc)) from exc
    if plot is not None:
        write_plot({summary["config"]["model"] or "bench": summary}, plot, f"gateway bench: {trace} against {url}")
