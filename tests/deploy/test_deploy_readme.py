"""The README: its configuration reference is the generator's output, and the commands it shows exist."""

from __future__ import annotations

import re
import shlex

import pytest
from pydantic import BaseModel

from gateway.config import Settings, load_settings
from gateway.config_reference import BEGIN, END, field_docs, main, render, update
from tests.deploy.tools import ROOT, parse_command

README = ROOT / "README.md"


def test_configuration_reference_is_up_to_date() -> None:
    text = README.read_text()
    assert update(text) == text, "README is stale: run python -m gateway.config_reference README.md"


def test_reference_lists_every_setting_with_its_docstring() -> None:
    reference = render()
    docs = field_docs(Settings)
    assert "`window.max_interval_s`" in reference and "`GATEWAY_WINDOW__MAX_INTERVAL_S`" in reference
    assert "`prefill_budget_tokens`" in reference  # engines[] fields
    for name, info in Settings.model_fields.items():
        nested = info.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            for field in nested.model_fields:  # every settings group has its table
                assert f"| `{name}.{field}` |" in reference, f"{name}.{field}"
        else:
            assert f"| `{name}` |" in reference, name
            assert docs[name].split()[0] in reference, name


def test_check_mode_reports_a_stale_readme(tmp_path) -> None:
    stale = tmp_path / "README.md"
    stale.write_text(f"intro\n{BEGIN}\nold table\n{END}\nrest\n")
    assert main(["--check", str(stale)]) == 1
    assert main([str(stale)]) == 0
    assert main(["--check", str(stale)]) == 0
    assert stale.read_text().startswith("intro\n") and stale.read_text().endswith("\nrest\n")
    with pytest.raises(ValueError, match="no section"):
        update("no markers")


def test_readme_gateway_commands_parse() -> None:
    commands = re.findall(r"^\.venv/bin/gateway (.+)$", README.read_text(), re.M)
    assert len(commands) >= 3, commands
    for command in commands:
        parse_command(shlex.split(command, comments=True))


def test_readme_gateway_configurations_load(tmp_path) -> None:
    blocks = [b for b in re.findall(r"^```yaml\n(.*?)^```", README.read_text(), re.M | re.S) if "engines:" in b]
    assert len(blocks) >= 2, blocks  # the cluster example and the P/D one
    for i, block in enumerate(blocks):
        path = tmp_path / f"gateway-{i}.yaml"
        path.write_text(block)
        assert load_settings(path).engines
    assert any(load_settings(tmp_path / f"gateway-{i}.yaml").pd_models() for i in range(len(blocks)))
