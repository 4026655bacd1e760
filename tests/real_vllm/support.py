"""The gateway in front of real vLLM servers, reading a real vLLM's ``/metrics`` in tests (counters by label), and
polling for a state."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import EngineConfig, PolicyName, ScrapeConfig, Settings
from gateway.sim.cluster import running_gateway
from scripts import real_vllm

T = TypeVar("T")


def series(text: str, name: str, key: str = "engine", **labels: str) -> dict[str, float]:
    """Sum of sample ``name`` per value of label ``key`` over the series matching ``labels``.

    On vLLM ``engine`` is the DP rank (``"0"``, ``"1"``...); on the gateway it is the engine's name and ``rank``
    the DP rank.
    """
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                value = sample.labels.get(key, "")
                out[value] = out.get(value, 0.0) + sample.value
    return out


async def scrape(url: str) -> str:
    """The ``/metrics`` text of the server at ``url``.

    The timeout is generous: while vLLM generates, its engine processes hold both cores of this machine and its
    API server (at a lower CPU priority than the tests) may answer late."""
    async with httpx.AsyncClient(timeout=30.0) as http:
        reply = await http.get(url + "/metrics")
        reply.raise_for_status()
        return reply.text


def moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Increase of a counter between two :func:`series` readings (label values that did not move left out)."""
    return {r: after[r] - before.get(r, 0.0) for r in sorted(after) if after[r] != before.get(r, 0.0)}


async def until(probe: Callable[[], Awaitable[T]], holds: Callable[[T], bool], what: str, timeout_s: float = 60.0) -> T:
    """Call ``probe`` every 0.1 s until ``holds`` its result; return that result.

    Raises:
        AssertionError: still not true after ``timeout_s``; the message gives ``what`` and the last result.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = await probe()
        if holds(value):
            return value
        if loop.time() > deadline:
            raise AssertionError(f"expected {what} within {timeout_s:.0f} s; last seen: {value!r}")
        await asyncio.sleep(0.1)


def engine_config(name: str, server: real_vllm.Server) -> EngineConfig:
    return EngineConfig(name=name, flavor="vllm", url=server.url, dp_size=server.dp_size, models=[server.model])


@contextlib.asynccontextmanager
async def gateway(policy: PolicyName, *engines: EngineConfig) -> AsyncIterator[str]:
    """The gateway, in this event loop on 127.0.0.1, in front of ``engines``; yields its base URL."""
    # The gateway's own defaults, but for a faster scrape: the tests poll for states that last seconds. (vLLM runs
    # at a lower CPU priority, see scripts/real_vllm.ENGINE_NICE; without that, this process, gateway and test
    # client alike, went unscheduled for seconds while vLLM generated on this 2-core machine.)
    settings = Settings(policy=policy, engines=list(engines), scrape=ScrapeConfig(interval_s=0.2))
    async with running_gateway(settings) as url:
        yield url
