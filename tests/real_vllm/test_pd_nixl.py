"""A real vLLM P/D pair behind the gateway: a single-rank prefill server and a single-rank decode server joined by
vLLM's NixlConnector (NIXL's UCX backend, the KV cache in CPU memory; ``scripts/real_vllm.start_pd``).

Requests go through the official ``openai`` client, streamed and not. The gateway splits each into its prefill leg
and its decode leg (``gateway.pd.vllm_nixl``), and the decode server takes the prompt's KV cache from the prefill
server instead of computing it: vLLM's own counters say where each prompt token came from
(``vllm:prompt_tokens_by_source_total``, source ``external_kv_transfer`` or ``local_compute``; vLLM 0.32
``v1/metrics/loggers.py``), and a greedy answer is the one the prefill server gives alone."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import openai
import pytest

from gateway.config import EngineConfig
from scripts.real_vllm import Server, running_pd
from tests.real_vllm.support import gateway, moved, scrape, series

pytestmark = pytest.mark.real_vllm

MODEL = "tiny"
"""Random weights: vLLM's own P/D machinery and counters, meaningless text, about 10x faster than SmolLM2."""
MAX_TOKENS = 8
FIXED = {"ignore_eos": True}
SOURCE = "vllm:prompt_tokens_by_source_total"


def prompt(tag: str) -> list[dict[str, str]]:
    """A chat prompt of about 300 tokens (a few of vLLM's 128-token CPU KV blocks) that shares no prefix with
    another tag's, so that no answer comes from the decode server's own prefix cache."""
    return [{"role": "user", "content": f"{tag}: " + "the quick brown fox jumps over the lazy dog. " * 30}]


@pytest.fixture(scope="module")
def pair(vllm_installed: None) -> Iterator[tuple[Server, Server]]:
    with running_pd(MODEL, max_num_seqs=4) as servers:
        yield servers


def pd_engines(pair: tuple[Server, Server]) -> list[EngineConfig]:
    prefill, decode = pair
    common = {"flavor": "vllm", "dp_size": 1, "models": [MODEL], "kv_connector": "nixl"}
    return [
        EngineConfig(name="p", url=prefill.url, role="prefill", **common),  # type: ignore[arg-type]
        EngineConfig(name="d", url=decode.url, role="decode", **common),  # type: ignore[arg-type]
    ]


async def ask(client: openai.AsyncOpenAI, tag: str, stream: bool) -> int:
    """One chat request through the gateway; its completion tokens."""
    if not stream:
        done = await client.chat.completions.create(
            model=MODEL,
            messages=prompt(tag),  # type: ignore[arg-type]
            max_tokens=MAX_TOKENS,
            extra_body=FIXED,
        )
        assert done.usage is not None and done.choices[0].message.content
        return done.usage.completion_tokens
    chunks = await client.chat.completions.create(
        model=MODEL,
        messages=prompt(tag),  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=FIXED,
    )
    usage = [c.usage.completion_tokens async for c in chunks if c.usage is not None]
    assert len(usage) == 1
    return usage[0]


async def counters(server: Server) -> dict[str, dict[str, float]]:
    text = await scrape(server.url)
    return {
        "source": series(text, SOURCE, key="source"),
        "success": series(text, "vllm:request_success_total"),
        "generated": series(text, "vllm:generation_tokens_total"),
        "prompt": series(text, "vllm:prompt_tokens_total"),
        "failed_transfers": series(text, "vllm:nixl_num_failed_transfers_total"),
    }


def grew(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {name: moved(before[name], after[name]) for name in after}


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "assembled"])
async def test_decode_takes_the_prompt_kv_from_prefill_over_nixl(pair: tuple[Server, Server], stream: bool) -> None:
    prefill, decode = pair
    tags = [f"{'streamed' if stream else 'assembled'} request {i}" for i in range(3)]
    p_before, d_before = await counters(prefill), await counters(decode)
    async with (
        gateway("sbs", *pd_engines(pair)) as url,
        openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client,
    ):
        tokens = await asyncio.gather(*(ask(client, tag, stream) for tag in tags))
        own = series(await scrape(url), "gateway_pd_transfers_total", key="outcome", protocol="nixl")
    p, d = grew(p_before, await counters(prefill)), grew(d_before, await counters(decode))
    assert tokens == [MAX_TOKENS] * len(tags)
    assert own == {"ok": len(tags)}, f"gateway's P/D attempts by outcome: {own}"
    # prefill ran each prompt once and generated one token for it (the prefill leg's max_tokens 1)
    assert p["success"] == {"0": len(tags)} and p["generated"] == {"0": len(tags)}, p
    # decode took every prompt token from prefill's KV cache and computed none of them
    prompt_tokens = d["prompt"]["0"]
    assert p["prompt"] == {"0": prompt_tokens}, (p, d)
    assert d["source"] == {"external_kv_transfer": prompt_tokens}, f"decode's prompt tokens by source: {d['source']}"
    assert d["generated"] == {"0": MAX_TOKENS * len(tags)} and d["failed_transfers"] == {}, d


async def test_an_answer_over_nixl_is_the_one_prefill_would_give(pair: tuple[Server, Server]) -> None:
    """The greedy answer through the P/D pair and from the prefill server alone: decode generated it on the KV
    cache it pulled, so a wrong or missing transfer would show. (The tiny model's random weights make the text
    noise, but noise that follows the KV cache: zeroing the cache a KV connector had handed over changed the first
    answer token. Log-probabilities would say more, but vLLM 0.32 computes their ranks with a ``torch.compile``d
    kernel, ``v1/sample/ops/logprobs.py``, whose first compilation took minutes on this busy CPU.)"""
    prefill, _ = pair
    request = {
        "model": MODEL,
        "messages": prompt("greedy"),
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "extra_body": FIXED,
    }
    answers = []
    async with gateway("sbs", *pd_engines(pair)) as url:
        for base in (url, prefill.url):
            async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0) as client:
                done = await client.chat.completions.create(**request)  # type: ignore[call-overload]
            assert done.usage is not None and done.usage.completion_tokens == MAX_TOKENS
            answers.append(done.choices[0].message.content)
    through_pd, alone = answers
    assert through_pd == alone, answers
