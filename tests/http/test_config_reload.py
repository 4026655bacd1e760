"""Reloading the configuration file (:mod:`gateway.server.reload`) into a running gateway: a bad file is refused
with the old configuration kept, a good one's engine changes are applied, other settings wait for a restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import EngineConfig
from gateway.server.app import create_app
from gateway.server.reload import (
    STARTING_POLL_S,
    ConfigSource,
    ReloadOnSignal,
    defer_sighup,
    reload_configuration,
    take_noted_sighup,
)
from gateway.server.state import GatewayState
from gateway.serving import serve_in_background
from gateway.sim.cluster import SimulatedEngine, simulated_engines
from tests.helpers import MODEL, total


def file_config(engines: list[EngineConfig], **more: Any) -> dict[str, Any]:
    return {"policy": "round_robin", "engines": [e.model_dump(mode="json") for e in engines], **more}


@contextlib.asynccontextmanager
async def reloadable(tmp_path: Path) -> AsyncIterator[tuple[GatewayState, str, Path, dict[str, EngineConfig]]]:
    """A gateway started from ``tmp_path/gateway.yaml`` listing engine ``a``; engine ``b`` runs too, unlisted."""
    specs = [SimulatedEngine("a", "vllm", 2, MODEL), SimulatedEngine("b", "sglang", 2, MODEL)]
    async with simulated_engines(specs, 20.0) as configs:
        engines = {e.name: e for e in configs}
        path = tmp_path / "gateway.yaml"
        path.write_text(json.dumps(file_config([engines["a"]])))
        app = create_app(ConfigSource(str(path)).load())
        async with serve_in_background(app) as url:
            state = app.state.gateway
            assert isinstance(state, GatewayState)
            yield state, url, path, engines


def names(state: GatewayState) -> list[str]:
    return [s.name for s in state.engine_set.list()]


async def test_a_bad_file_is_refused_and_the_running_configuration_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with reloadable(tmp_path) as (state, url, path, engines):
        source = ConfigSource(str(path))
        bad = [
            json.dumps(file_config([engines["a"], engines["b"]], policy="no_such_policy")),
            json.dumps(file_config([engines["a"], engines["a"]])),  # a name twice
            "engines: [unclosed",
        ]
        for text in bad:
            path.write_text(text)
            with caplog.at_level(logging.ERROR, logger="gateway.server.reload"):
                assert await reload_configuration(state, source) is False
        assert sum("configuration reload refused" in r.getMessage() for r in caplog.records) == 3
        assert "policy" in caplog.records[0].getMessage()
        path.unlink()
        assert await reload_configuration(state, source) is False
        assert names(state) == ["a"]
        async with httpx.AsyncClient(timeout=30) as http:
            text = (await http.get(url + "/metrics")).text
            assert total(text, "gateway_config_reloads_total", result="refused") == 4
            assert total(text, "gateway_config_reloads_total", result="applied") == 0
            chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            assert (await http.post(url + "/v1/chat/completions", json=chat)).status_code == 200


async def test_a_good_file_adds_removes_and_replaces_engines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with reloadable(tmp_path) as (state, url, path, engines):
        source = ConfigSource(str(path))
        path.write_text(json.dumps(file_config([engines["a"], engines["b"]])))
        assert await reload_configuration(state, source) is True
        assert names(state) == ["a", "b"]
        assert state.engine_set.status("b").state == "ready"

        path.write_text(json.dumps(file_config([engines["b"]])))
        assert await reload_configuration(state, source) is True
        assert names(state) == ["b"]

        bigger = engines["b"].model_copy(update={"prefill_budget_tokens": 4096})
        path.write_text(json.dumps(file_config([bigger], window={"max_interval_s": 0.05})))
        with caplog.at_level(logging.WARNING, logger="gateway.server.reload"):
            assert await reload_configuration(state, source) is True
        assert [s.config.prefill_budget_tokens for s in state.engines.values()] == [4096]
        assert any("window changed" in r.getMessage() and "next restart" in r.getMessage() for r in caplog.records)
        assert state.settings.window.max_interval_s != 0.05  # the running value stays
        async with httpx.AsyncClient(timeout=30) as http:
            text = (await http.get(url + "/metrics")).text
        assert total(text, "gateway_config_reloads_total", result="applied") == 3
        assert total(text, "gateway_engine_changes_total", change="added", source="reload") == 2
        assert total(text, "gateway_engine_changes_total", change="removed", source="reload") == 2


async def test_a_gateway_on_its_embedded_engines_keeps_them(tmp_path: Path) -> None:
    async with reloadable(tmp_path) as (state, _url, path, engines):
        path.write_text(json.dumps(file_config([])))
        assert await reload_configuration(state, ConfigSource(str(path)), embedded=True) is True
        path.write_text(json.dumps(file_config([engines["b"]])))
        assert await reload_configuration(state, ConfigSource(str(path)), embedded=True) is False
        assert names(state) == ["a"]


def test_the_settings_source_pickles() -> None:
    import pickle

    source = ConfigSource("/etc/gateway.yaml", {"port": 8000})
    assert pickle.loads(pickle.dumps(source)) == source


async def test_a_sighup_while_the_process_starts_is_reloaded_once_it_serves(tmp_path: Path) -> None:
    # a SIGHUP before the handler is installed (a --workers child starting) and one before the gateway's lifespan
    # has started are both kept, and the file is reloaded once it serves: neither ends the process nor is lost
    async with reloadable(tmp_path) as (state, _url, path, engines):
        path.write_text(json.dumps(file_config([engines["a"], engines["b"]])))
        previous = signal.getsignal(signal.SIGHUP)
        try:
            defer_sighup()
            os.kill(os.getpid(), signal.SIGHUP)
            assert take_noted_sighup() is True and take_noted_sighup() is False
            os.kill(os.getpid(), signal.SIGHUP)  # noted again, for the handler installed below
            started: list[GatewayState] = []
            with ReloadOnSignal(lambda: started[0] if started else None, ConfigSource(str(path))) as reloader:
                await asyncio.sleep(5 * STARTING_POLL_S)
                assert names(state) == ["a"], "nothing reloaded before the lifespan started"
                started.append(state)  # the lifespan has started
                await asyncio.wait_for(asyncio.gather(*reloader._tasks), timeout=30)
            assert names(state) == ["a", "b"]
            assert state.metrics.config_reloads.labels("applied")._value.get() == 1
        finally:
            signal.signal(signal.SIGHUP, previous)
