"""``engines[].prefill_alignment: auto``: the prober reads SGLang's ``/get_server_info`` once the engine answers
its health probe and tells the scheduler whether the engine runs the PrefillDelayer; vLLM reports no such
setting and is not asked; a declared value is never overridden."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from gateway.config import EngineConfig, HealthConfig, UpstreamConfig
from gateway.engines import Engine
from gateway.engines.client import EngineClient
from gateway.load.health import HealthBook
from gateway.load.prober import HealthProber
from gateway.serving import serve_in_background
from gateway.sim.calibration import EngineModelConfig
from gateway.sim.mock_engine.app import MockEngineConfig, create_mock_engine_app
from gateway.telemetry import GatewayMetrics
from gateway.types import RankKey

MODEL = "deepseek-v3"
HEALTH = HealthConfig(probe_interval_s=60, probe_timeout_s=5.0)


async def probe_once(flavor: str, delayer: bool, **engine_fields: Any) -> list[tuple[str, bool]]:
    """Probe one mock engine once; return what reached ``on_alignment``."""
    model = replace(EngineModelConfig(), enable_prefill_delayer=delayer)
    app = create_mock_engine_app(MockEngineConfig(flavor, 2, MODEL, engine_model=model))
    seen: list[tuple[str, bool]] = []
    async with serve_in_background(app) as url, EngineClient(UpstreamConfig()) as client:
        engine = Engine.from_config(
            EngineConfig(name="e", flavor=flavor, url=url, dp_size=2, models=[MODEL], **engine_fields)
        )
        health = HealthBook([RankKey("e", 0), RankKey("e", 1)], HEALTH)
        prober = HealthProber(
            client, [engine], health, GatewayMetrics(), HEALTH, on_alignment=lambda *a: seen.append(a)
        )
        assert await prober.once(engine) is True
        assert await prober.once(engine) is True  # read once, not at every probe
    return seen


async def test_sglang_reports_whether_it_runs_the_prefill_delayer() -> None:
    assert await probe_once("sglang", delayer=True) == [("e", True)]
    assert await probe_once("sglang", delayer=False) == [("e", False)]


async def test_vllm_and_declared_engines_are_not_asked() -> None:
    assert await probe_once("vllm", delayer=False) == []
    assert await probe_once("sglang", delayer=True, prefill_alignment="none") == []
