"""The front door counts prompt tokens with a model's configured tokenizer and learns from the engines' counts."""

from __future__ import annotations

import importlib.resources
import shutil
from pathlib import Path

import pytest

from gateway.config import EngineConfig, ModelConfig, Settings
from gateway.server.app import build_state
from gateway.telemetry import sum_samples
from gateway.workload.tokenizer import deepseek_tokenizer
from tests.helpers import CHAT, ECHO_MODEL, gateway_before


@pytest.fixture
def deepseek_file(tmp_path: Path) -> Path:
    package = importlib.resources.files("deepseek_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with importlib.resources.as_file(package / name) as file:
            shutil.copy(file, tmp_path / name)
    return tmp_path / "tokenizer.json"


async def test_a_configured_tokenizer_counts_with_the_chat_template(deepseek_file: Path) -> None:
    models = {ECHO_MODEL: ModelConfig(tokenizer=deepseek_file)}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one two three four five"}]
    async with gateway_before("sglang", models=models) as client:
        r = await client.post("/v1/chat/completions", json={**CHAT, "messages": messages})
        assert r.status_code == 200
        text = (await client.get("/metrics")).text
    expected = deepseek_tokenizer().count_body({"messages": messages})
    assert sum_samples(text, "gateway_dispatched_prompt_tokens_total") == expected
    assert sum_samples(text, "gateway_prompt_token_correction", model=ECHO_MODEL) == 1.0


async def test_reported_counts_move_the_exported_correction() -> None:
    engine = EngineConfig(name="e", flavor="vllm", url="http://127.0.0.1:9", models=[ECHO_MODEL])
    state = build_state(Settings(engines=[engine]))
    try:
        for _ in range(200):
            estimated = state.prompt_counter.count(ECHO_MODEL, {"prompt": "x" * 8192})
            state.prompt_tokens_reported(ECHO_MODEL, estimated, 4096)
        text = state.metrics.render().decode()
    finally:
        await state.client.aclose()
    assert sum_samples(text, "gateway_prompt_token_correction", model=ECHO_MODEL) == pytest.approx(2.0, rel=0.01)
    assert sum_samples(text, "gateway_prompt_token_observations_total", model=ECHO_MODEL) == 200
    assert 0 < sum_samples(text, "gateway_prompt_token_estimate_error", model=ECHO_MODEL) < 0.1
