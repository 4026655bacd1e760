"""What every test gets: no ``GATEWAY_*`` variable of the machine running it, the marker of its tier (its folder:
``unit``, ``http``, ``e2e``, ``deploy``, ``real_vllm``; see tests/README.md), and the shared fixtures."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.scheduling import kernel
from tests.helpers import Cluster, running_cluster

TIERS = ("unit", "http", "e2e", "deploy", "real_vllm")
"""The test folders, each also the name of a pytest marker (registered in pyproject.toml)."""
_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test with its tier, the folder under ``tests/`` it lives in."""
    for item in items:
        if item.path.is_relative_to(_HERE) and (folder := item.path.relative_to(_HERE).parts[0]) in TIERS:
            item.add_marker(folder)


@pytest.fixture(scope="session", autouse=True)
def compiled_allocators() -> None:
    """The window allocators' compiled loops (:mod:`gateway.scheduling.kernel`), compiled or loaded from numba's
    on-disk cache once per session before the first test: no test pays the compile, and the gateway processes
    tests start load the cache instead of compiling under their readiness timeouts."""
    kernel.load()


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``GATEWAY_*`` variable of the machine running the tests leaks into the settings a test builds."""
    for name in list(os.environ):
        if name.upper().startswith("GATEWAY_"):
            monkeypatch.delenv(name)


@pytest.fixture
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    """:func:`tests.helpers.running_cluster` with its defaults; the policy is ``"sbs"``, or the parameter given by
    ``@pytest.mark.parametrize("cluster", [...], indirect=True)``."""
    async with running_cluster(getattr(request, "param", "sbs")) as running:
        yield running
