"""The command line: help, and configuration errors reported at start."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from gateway.cli import main


@pytest.mark.parametrize("command", [[], ["serve"], ["mock-engine"], ["bench"], ["simulate"]])
def test_help_is_complete(command: list[str]) -> None:
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_invalid_configuration_fails_at_start_naming_the_field(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "policy: sbs\nengines:\n  - {name: e, flavor: tgi, url: 'http://127.0.0.1:1', dp_size: 2, models: [m]}\n"
    )
    result = CliRunner().invoke(main, ["serve", "--config", str(config)])
    assert result.exit_code != 0
    assert "engines.0.flavor" in result.output


def test_missing_configuration_file_is_reported(tmp_path) -> None:
    result = CliRunner().invoke(main, ["serve", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code != 0
    assert "not found" in result.output


def test_bench_reports_a_bad_trace_cleanly(tmp_path) -> None:
    result = CliRunner().invoke(main, ["bench", "--url", "http://127.0.0.1:1", "--trace", str(tmp_path / "x.csv")])
    assert result.exit_code != 0
    assert "Error" in result.output
