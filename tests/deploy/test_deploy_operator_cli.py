"""Operator ergonomics of the command line: complete help, --plot PNGs, a clear message without matplotlib."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from gateway.cli import main
from tests.helpers import Cluster

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_every_command_and_option_is_documented() -> None:
    assert main.help and "Quick start" in main.help
    ctx = click.Context(main, info_name="gateway")
    assert set(main.list_commands(ctx)) == {"serve", "scheduler", "mock-engine", "bench", "simulate", "stack"}
    for name in main.list_commands(ctx):
        command = main.get_command(ctx, name)
        assert command is not None and command.help, f"gateway {name} has no help"
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert param.help, f"gateway {name} {param.opts[0]} has no help"


def test_simulate_writes_a_plot_and_the_figures(tmp_path: Path) -> None:
    png, out = tmp_path / "figures" / "policies.png", tmp_path / "policies.json"
    args = ["simulate", "--trace", "azure-conv", "--duration", "20", "--instances", "1", "--dp-size", "2"]
    args += ["--policy", "sbs", "--policy", "round_robin", "--output", str(out), "--plot", str(png), "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert set(json.loads(out.read_text())) == {"sbs", "round_robin"}
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert png.stat().st_size > 10_000  # three panels of bars, not an empty canvas


async def test_bench_writes_a_plot(tmp_path: Path, cluster: Cluster) -> None:
    png = tmp_path / "bench.png"
    args = ["bench", "--url", cluster.gateway_url, "--trace", "azure-conv", "--max-requests", "4"]
    args += ["--rate-scale", "50", "--plot", str(png), "--no-progress"]
    result = await asyncio.to_thread(CliRunner().invoke, main, args)
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    png = tmp_path / "x.png"
    result = CliRunner().invoke(main, ["simulate", "--trace", "azure-conv", "--duration", "5", "--plot", str(png)])
    assert result.exit_code == 1, result.output
    assert "--plot needs matplotlib" in result.output and "pip install 'sbs-gateway[bench]'" in result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a message, not a traceback
    assert "completed" not in result.output, "it should fail before simulating"
    assert not png.exists()
