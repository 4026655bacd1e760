"""Prefix reuse end to end: the replay's prompts share text exactly where the trace's block ids are shared, and the
simulated engines (as shipped, prefix cache on) find that reuse and export it in their own metrics."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.replay.client import PromptCount, request_body
from gateway.sim.calibration import EngineModelConfig
from gateway.sim.mock_engine.app import MockEngineConfig, create_mock_engine_app
from gateway.sim.mock_engine.protocol import Flavor, PrefixTokenizer
from gateway.tokens import count_prompt_tokens
from gateway.workload.tokenizer import deepseek_tokenizer, render_chat

MODEL = "deepseek-v3"
PROMPT = 1300
FIRST, SECOND = (5, 6, 7), (5, 6, 8)  # two shared 512-token blocks


def messages_text(body: dict[str, Any]) -> str:
    return str(body["messages"][0]["content"])


@pytest.mark.parametrize("prompts", ["estimate", "tokenizer"])
def test_replayed_prompts_share_exactly_the_trace_blocks(prompts: PromptCount) -> None:
    a = request_body("chat", MODEL, 0, PROMPT, 4, prompts, FIRST)
    b = request_body("chat", MODEL, 1, PROMPT, 4, prompts, SECOND)
    c = request_body("chat", MODEL, 2, PROMPT, 4, prompts, (9, 6, 7))
    if prompts == "estimate":
        assert count_prompt_tokens(a) == count_prompt_tokens(b) == PROMPT
        ta, tb, tc = messages_text(a), messages_text(b), messages_text(c)
        assert ta[:4096] == tb[:4096] and ta[4096:4104] != tb[4096:4104]  # two blocks of 2,048 characters
        assert ta[:8] != tc[:8]
        return
    tok = deepseek_tokenizer()
    ia, ib, ic = (tok.encode(render_chat(body["messages"])) for body in (a, b, c))
    assert len(ia) == len(ib) == PROMPT
    shared = next(i for i, (x, y) in enumerate(zip(ia, ib, strict=True)) if x != y)
    assert 2 + 1024 <= shared <= 2 + 1024 + 1  # BOS and User, two blocks, at most the next block's first token
    assert next(i for i, (x, y) in enumerate(zip(ia, ic, strict=True)) if x != y) <= 2 + 1  # no block shared


def hit_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if "cache" in s.name or "effective" in s.name
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    [found] = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    return found


@pytest.mark.parametrize("flavor", ["vllm", "sglang"])
@pytest.mark.parametrize(
    ("tokenizer", "prompts"),
    [("estimate", "estimate"), pytest.param("deepseek", "tokenizer", id="deepseek-tokenizer")],
)
async def test_the_engine_finds_the_replayed_reuse_on_the_same_rank(
    flavor: Flavor, tokenizer: PrefixTokenizer, prompts: PromptCount
) -> None:
    config = MockEngineConfig(
        flavor, 2, speed=1000.0, engine_model=EngineModelConfig.as_shipped(flavor, 2), tokenizer=tokenizer
    )
    app = create_mock_engine_app(config)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://engine", timeout=30) as client,
    ):
        for index, blocks, rank in ((0, FIRST, 0), (1, SECOND, 0), (2, SECOND, 1)):
            body = {**request_body("chat", MODEL, index, PROMPT, 4, prompts, blocks), "stream": False}
            pin: dict[str, Any] = {"headers": {"X-data-parallel-rank": str(rank)}}
            if flavor == "sglang":
                body["routed_dp_rank"], pin = rank, {}
            response = await client.post("/v1/chat/completions", json=body, **pin)
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["prompt_tokens"] == PROMPT
        samples = hit_samples((await client.get("/metrics")).text)
    if flavor == "vllm":
        assert value(samples, "vllm:prefix_cache_hits_total", engine="0") == 1024
        assert value(samples, "vllm:prefix_cache_queries_total", engine="0") == 2 * PROMPT
        assert value(samples, "vllm:prefix_cache_hits_total", engine="1") == 0
    else:
        assert value(samples, "sglang:cache_hit_rate", dp_rank="0") == pytest.approx(1024 / PROMPT)
        assert value(samples, "sglang:prefill_effective_tokens_total", dp_rank="0", mode="device_hit") == 1024
        assert value(samples, "sglang:cache_hit_rate", dp_rank="1") == 0.0
