"""Click options and helpers several ``gateway`` commands share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, get_args

import click

from gateway.config import PolicyName

F = TypeVar("F", bound=Callable[..., Any])

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


def config_option(help: str, **kwargs: Any) -> Callable[[F], F]:
    """``--config``, the gateway's YAML configuration file (parameter ``config_path``)."""
    return click.option("--config", "config_path", type=click.Path(dir_okay=False), help=help, **kwargs)


def policy_option(help: str = "Scheduling policy, overriding the configuration.") -> Callable[[F], F]:
    """``--policy``: one scheduling policy, overriding the configuration's (``None`` when not given)."""
    return click.option("--policy", type=POLICIES, default=None, help=help)


def log_level_option(default: str) -> Callable[[F], F]:
    """``--log-level``: the logging threshold of stderr."""
    return click.option(
        "--log-level", type=LOG_LEVELS, default=default, show_default=True, help="Logging threshold (stderr)."
    )


def check_plot(plot: str | None) -> None:
    """Fail before a long run if --plot was given and matplotlib is missing."""
    if plot is not None:
        from gateway.plots import PlotUnavailableError, require_matplotlib

        try:
            require_matplotlib()
        except PlotUnavailableError as exc:
            raise click.ClickException(str(exc)) from exc


def write_plot(summaries: dict[str, Any], plot: str, title: str) -> None:
    """Draw ``summaries`` (name → summary) as the PNG ``plot``; a click error if that fails."""
    from gateway.plots import PlotUnavailableError, plot_summaries

    try:
        plot_summaries(summaries, plot, title)
    except (PlotUnavailableError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {plot}", err=True)
