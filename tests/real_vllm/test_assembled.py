"""A non-streamed request through the gateway, which streams it from a real vLLM and assembles the answer, against
the same request sent to vLLM directly, greedy (temperature 0; ``n`` 2 is sampled with a fixed ``seed``, since vLLM
refuses ``n`` > 1 when greedy): the same answer in meaning (content, finish reason, usage and every other field
vLLM fills), ``id`` and ``created`` apart."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from scripts.real_vllm import Server, running
from tests.real_vllm.support import engine_config, gateway

pytestmark = pytest.mark.real_vllm

MODEL = "smollm2"
"""The real SmolLM2-135M: its greedy answers are text, not noise."""

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 24}
COMPLETION = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 24}


@pytest.fixture(scope="module")
def server(vllm_installed: None) -> Iterator[Server]:
    with running(MODEL) as servers:
        yield servers[0]


@pytest.fixture
async def gateway_url(server: Server) -> AsyncIterator[str]:
    async with gateway("round_robin", engine_config("vllm", server)) as url:
        yield url


def _meaning(value: Any) -> Any:
    """``value`` without ``null`` and empty-list fields (vLLM sends a field it did not fill as one of them, the
    stream leaves it out) and without ``id`` and ``created``."""
    if isinstance(value, dict):
        kept = {k: _meaning(v) for k, v in value.items() if k not in ("id", "created")}
        return {k: v for k, v in kept.items() if v is not None and v != []}
    if isinstance(value, list):
        return [_meaning(v) for v in value]
    return value


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {**CHAT, "temperature": 0}),
        ("/v1/completions", {**COMPLETION, "temperature": 0}),
        ("/v1/chat/completions", {**CHAT, "n": 2, "temperature": 1.0, "seed": 7}),
    ],
    ids=["chat", "completions", "chat-n2"],
)
async def test_the_assembled_answer_equals_vllms_own(
    gateway_url: str, server: Server, path: str, body: dict[str, Any]
) -> None:
    async with httpx.AsyncClient(timeout=120) as http:
        direct = await http.post(server.url + path, json=body)
        via_gateway = await http.post(gateway_url + path, json=body)
    assert direct.status_code == via_gateway.status_code == 200, via_gateway.text
    expected, assembled = direct.json(), via_gateway.json()
    assert _meaning(assembled) == _meaning(expected)
    for ours, theirs in zip(assembled["choices"], expected["choices"], strict=True):
        if "message" in theirs:
            assert ours["message"]["content"] == theirs["message"]["content"]
        else:
            assert ours["text"] == theirs["text"]
        assert ours["finish_reason"] == theirs["finish_reason"]
    assert assembled["usage"] == {k: v for k, v in expected["usage"].items() if v is not None}
