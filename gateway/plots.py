"""PNG figures of ``gateway bench`` and ``gateway simulate`` summaries (their ``--plot FILE.png`` option).

One figure, one panel per latency (TTFT, TPOT, end-to-end): for each run (a bench replay, or a simulated
policy) its mean, p50, p90 and p99 as grouped bars in milliseconds from zero, with each run's output
throughput in the legend. Input is the summary dict both commands write as JSON
(:func:`gateway.workload.stats.summarize`, :meth:`gateway.sim.simulate.SimResult.summary`).

matplotlib is optional (the ``bench`` extra): :func:`require_matplotlib` says how to install it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install 'sbs-gateway[bench]' (from a clone: .venv/bin/pip install -e '.[bench]')"
PANELS = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "End-to-end latency"))
STATS = ("mean", "p50", "p90", "p99")


class PlotUnavailableError(RuntimeError):
    """matplotlib is not installed; the message says how to install it."""


def require_matplotlib() -> None:
    """Check that matplotlib can be imported (before a long run whose result is to be plotted).

    Raises:
        PlotUnavailableError: it cannot; the message gives the install command.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise PlotUnavailableError(f"--plot needs matplotlib, which is not installed: {INSTALL_HINT}") from exc


def plot_summaries(summaries: Mapping[str, Mapping[str, Any]], path: str | Path, title: str) -> None:
    """Write a PNG of the latency percentiles of each run in ``summaries`` (run name → summary dict).

    Raises:
        PlotUnavailableError: matplotlib is not installed.
        OSError: ``path`` cannot be written (its parent folders are created).
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.5 * len(PANELS), 4.2), layout="constrained")
    axes = figure.subplots(1, len(PANELS))
    width = 0.8 / max(1, len(summaries))
    for ax, (key, label) in zip(axes, PANELS, strict=True):
        for n, (run, summary) in enumerate(summaries.items()):
            values = [(summary[key].get(stat) or 0.0) * 1000 for stat in STATS]
            throughput = summary.get("output_throughput_tok_s") or 0.0
            ax.bar(
                [i + (n - (len(summaries) - 1) / 2) * width for i in range(len(STATS))],
                values,
                width,
                label=f"{run} ({throughput:,.0f} tok/s)",
            )
        ax.set_xticks(range(len(STATS)), STATS)
        ax.set_ylabel("ms")
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize="small")
    figure.suptitle(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
