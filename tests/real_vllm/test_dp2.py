"""The gateway against one real vLLM server with ``--data-parallel-size 2`` (internal load balancing).

One endpoint, two DP ranks (``engine="0"``/``"1"`` in ``/metrics``), requests pinned by the
``X-data-parallel-rank`` header; the gateway sees it as one vLLM engine with ``dp_size=2``. ``--max-num-seqs 2``
per rank, so that a burst of more than four requests makes some wait inside the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest

from gateway.engines.vllm import VllmAdapter
from scripts.real_vllm import Server, running
from tests.helpers import stream_chat
from tests.real_vllm.support import engine_config, gateway, moved, scrape, series, until

pytestmark = pytest.mark.real_vllm

MODEL = "smollm2"
"""The real SmolLM2-135M: about 50 tokens/s a stream here, slow enough that an abort is seen well before a long
request could finish (the random-weight ``tiny`` model runs ~400 tokens/s, and on a busy CPU vLLM sometimes took
over a second to act on a disconnect)."""

MAX_NUM_SEQS = 2
FIXED = {"ignore_eos": True}
"""Generate exactly ``max_tokens`` tokens: lengths are fixed, the text (random weights) is never looked at."""
SUCCESS = "vllm:request_success_total"
LONG_TOKENS = 800
"""Tokens of each long stream of the burst test: at 2 x 2 streams on this CPU, about 15 s."""


@pytest.fixture(scope="module")
def dp2(vllm_installed: None) -> Iterator[Server]:
    with running(MODEL, dp_size=2, max_num_seqs=MAX_NUM_SEQS) as servers:
        yield servers[0]


@pytest.fixture(params=["sbs", "round_robin"])
async def gateway_url(request: pytest.FixtureRequest, dp2: Server) -> AsyncIterator[str]:
    async with gateway(request.param, engine_config("dp2", dp2)) as url:
        yield url


async def test_openai_client_chat_and_completions_streaming_and_not(gateway_url: str) -> None:
    async with openai.AsyncOpenAI(base_url=gateway_url + "/v1", api_key="unused") as client:
        chat = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hello!"}], max_tokens=7, extra_body=FIXED
        )
        assert chat.object == "chat.completion"
        assert chat.usage is not None and chat.usage.completion_tokens == 7, chat.usage
        assert chat.choices[0].finish_reason == "length"

        chunks, usage, finish = 0, None, None
        for chunk in await stream_chat(client, MODEL, max_tokens=12):
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                chunks += 1
                finish = choice.finish_reason or finish
        assert usage is not None and usage.completion_tokens == 12 and usage.prompt_tokens > 0, usage
        assert 1 < chunks <= 13, f"expected one chunk per token (plus the role chunk), got {chunks}"
        assert finish == "length"

        whole = await client.completions.create(model=MODEL, prompt="Once upon", max_tokens=5, extra_body=FIXED)
        assert whole.usage is not None and whole.usage.completion_tokens == 5, whole.usage
        streamed = await client.completions.create(
            model=MODEL,
            prompt="Once upon",
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=FIXED,
        )
        tokens = [chunk.usage.completion_tokens async for chunk in streamed if chunk.usage is not None]
        assert tokens == [6]


async def test_scraper_reads_both_ranks_of_the_real_metrics(dp2: Server) -> None:
    ranks = VllmAdapter().parse_metrics(await scrape(dp2.url))
    assert sorted(ranks) == [0, 1], ranks
    for rank, load in ranks.items():
        assert load.running == 0 and load.waiting == 0, (rank, load)
        assert load.kv_usage is not None and 0.0 <= load.kv_usage <= 1.0, (rank, load)


async def test_load_view_follows_a_burst(dp2: Server) -> None:
    """Four long streams fill the 2 x 2 seats, six short ones then queue behind them: the engine runs 2 and
    queues 3 per rank, the gateway's view agrees, KV usage (scraped only) rises, and everything drains to zero.

    The long streams hold that state for seconds, long enough for both views to be polled several times; a
    state lasting one short round could pass between two polls."""
    adapter = VllmAdapter()

    async def engine_view() -> dict[int, tuple[float, float]]:
        return {r: (m.running, m.waiting) for r, m in adapter.parse_metrics(await scrape(dp2.url)).items()}

    async with (
        gateway("round_robin", engine_config("dp2", dp2)) as url,
        openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", timeout=600) as client,
    ):

        async def gateway_view() -> dict[str, dict[str, float]]:
            text = await scrape(url)
            return {f: series(text, f"gateway_rank_{f}", key="rank") for f in ("running", "waiting", "kv_usage")}

        async def one(i: int, max_tokens: int) -> int:
            """Tokens generated for a streamed request (from its usage chunk: when a reader lags, vLLM merges
            several tokens into one chunk, so chunks undercount)."""
            reply = await client.completions.create(
                model=MODEL,
                prompt=f"request {i}",
                max_tokens=max_tokens,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=FIXED,
            )
            usage = [chunk.usage.completion_tokens async for chunk in reply if chunk.usage is not None]
            assert len(usage) == 1, usage
            return usage[0]

        # round robin: long streams 0..3 go to ranks 0, 1, 0, 1 and take both seats of each rank
        long = [asyncio.create_task(one(i, LONG_TOKENS)) for i in range(4)]
        seated = {0: (2.0, 0.0), 1: (2.0, 0.0)}
        await until(engine_view, lambda v: v == seated, f"the engine's own gauges at {seated}")
        short = [asyncio.create_task(one(i, 4)) for i in range(4, 10)]
        full = {0: (2.0, 3.0), 1: (2.0, 3.0)}
        await until(engine_view, lambda v: v == full, f"the engine's own gauges at {full}")
        seen = await until(
            gateway_view,
            lambda v: v["running"] == {"0": 2.0, "1": 2.0} and v["waiting"] == {"0": 3.0, "1": 3.0},
            "the gateway's load view at 2 running and 3 waiting per rank",
        )
        assert all(kv > 0 for kv in seen["kv_usage"].values()), seen
        assert not any(task.done() for task in long), "a long stream ended before both views saw the burst"
        assert await asyncio.gather(*long) == [LONG_TOKENS] * 4
        assert await asyncio.gather(*short) == [4] * 6
        idle = {0: (0.0, 0.0), 1: (0.0, 0.0)}
        await until(engine_view, lambda v: v == idle, "the engine idle again")
        await until(
            gateway_view,
            lambda v: set(v["running"].values()) == {0.0} and set(v["waiting"].values()) == {0.0},
            "the gateway's load view back at zero",
        )


async def test_rank_pinning_reaches_the_rank_asked_for(dp2: Server) -> None:
    body = {"model": MODEL, "prompt": "pinned", "max_tokens": 3, **FIXED}
    before = series(await scrape(dp2.url), SUCCESS)
    async with httpx.AsyncClient(base_url=dp2.url, timeout=60) as http:
        for rank in (1, 1, 1, 0):
            headers: dict[str, str] = {}
            VllmAdapter().pin_rank(dict(body), headers, rank)
            reply = await http.post("/v1/completions", json=body, headers=headers)
            assert reply.status_code == 200, reply.text
        headers = {}
        VllmAdapter().pin_rank(dict(body), headers, 2)
        out_of_range = await http.post("/v1/completions", json=body, headers=headers)
    assert moved(before, series(await scrape(dp2.url), SUCCESS)) == {"0": 1.0, "1": 3.0}
    assert out_of_range.status_code == 400, out_of_range.text


async def test_gateway_placements_land_on_the_ranks_it_chose(gateway_url: str, dp2: Server) -> None:
    before = series(await scrape(dp2.url), SUCCESS)
    async with openai.AsyncOpenAI(base_url=gateway_url + "/v1", api_key="unused") as client:
        await asyncio.gather(
            *(
                client.completions.create(model=MODEL, prompt="x" * (50 * (i + 1)), max_tokens=4, extra_body=FIXED)
                for i in range(8)
            )
        )
    placed = series(await scrape(gateway_url), "gateway_dispatched_requests_total", key="rank")
    served = moved(before, series(await scrape(dp2.url), SUCCESS))
    assert sum(placed.values()) == 8, placed
    assert served == {r: v for r, v in placed.items() if v}, f"engine served {served}, gateway placed {placed}"


async def test_client_disconnect_mid_stream_aborts_the_request_in_vllm(gateway_url: str, dp2: Server) -> None:
    """vLLM 0.32 does not count a client's abort in ``request_success_total{finished_reason="abort"}`` (its
    issues #31503, #55634; seen here too): the abort shows as a request that leaves the running set without
    finishing, its generated tokens frozen far short of ``max_tokens``."""
    adapter = VllmAdapter()
    max_tokens = 2000

    async def engine_state() -> tuple[float, float, float]:
        """(requests running, requests finished for any reason, tokens generated) since ``before``."""
        text = await scrape(dp2.url)
        finished = sum(moved(before_finished, series(text, SUCCESS)).values())
        generated = sum(moved(before_generated, series(text, "vllm:generation_tokens_total")).values())
        return sum(m.running for m in adapter.parse_metrics(text).values()), finished, generated

    text = await scrape(dp2.url)
    before_finished, before_generated = series(text, SUCCESS), series(text, "vllm:generation_tokens_total")
    body = {"model": MODEL, "prompt": "a long one", "max_tokens": max_tokens, "stream": True, **FIXED}
    async with (
        httpx.AsyncClient(timeout=60) as http,
        http.stream("POST", gateway_url + "/v1/completions", json=body) as reply,
    ):
        assert reply.status_code == 200
        # Hold the line iterator: once a broken-off async generator is garbage-collected, its finalizer closes the
        # response (httpcore closes the connection on GeneratorExit), which would disconnect before we mean to.
        lines = reply.aiter_lines()
        events = 0
        async for line in lines:
            events += line.startswith("data: {")
            if events == 3:
                break
        await until(engine_state, lambda v: v[0] == 1, "the request running in vLLM while streamed")
    # leaving the block closed the connection mid-stream
    _, finished, generated = await until(engine_state, lambda v: v[0] == 0, "nothing left running")
    await asyncio.sleep(1.0)
    assert await engine_state() == (0.0, finished, generated), "vLLM went on generating after the abort"
    # no request finished, and the tokens stopped short of max_tokens and stayed there: vLLM aborted it (how far it
    # got depends on how quickly the disconnect was passed along: 3 to 9 tokens here, with vLLM at a lower CPU
    # priority than this process)
    assert finished == 0 and 3 <= generated < max_tokens, (finished, generated)
    kv = {r: m.kv_usage for r, m in adapter.parse_metrics(await scrape(dp2.url)).items()}
    assert kv == {0: 0.0, 1: 0.0}, f"expected the KV cache freed, saw {kv}"


@pytest.mark.parametrize("stream", [False, True])
async def test_engine_errors_come_back_openai_style(gateway_url: str, stream: bool) -> None:
    async with openai.AsyncOpenAI(base_url=gateway_url + "/v1", api_key="unused", max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=100_000, stream=stream
            )
    assert caught.value.status_code == 400
    error = caught.value.body
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, error
    assert "100000" in error["message"] or "max_tokens" in error["message"], error
    async with httpx.AsyncClient() as http:
        raw = await http.post(
            gateway_url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 100_000}
        )
    assert raw.status_code == 400 and list(raw.json()) == ["error"], raw.text


async def multi_turn_prefix_hits_from(gateway_url: str, dp2: Server, first: int) -> tuple[float, float]:
    """Four conversations of three turns each, one after another, through the gateway: each turn's prompt is the
    conversation so far (a 2,500-character system prompt of its own, then the turns); returns the prefix-cache hit
    tokens and query tokens vLLM counted meanwhile, summed over its ranks."""
    hits_before = series(await scrape(dp2.url), "vllm:prefix_cache_hits_total")
    queries_before = series(await scrape(dp2.url), "vllm:prefix_cache_queries_total")
    async with openai.AsyncOpenAI(base_url=gateway_url + "/v1", api_key="unused") as client:
        for conversation in range(first, first + 4):
            # 2,500 characters of common words (about 550 tokens): past the gateway's first 2,048-character prefix
            # block, well inside the model's 2,048-token context after three turns
            system = f"Conversation {conversation}. " + "The quick brown fox jumps over the lazy dog. " * 55
            messages = [{"role": "system", "content": system}]
            for turn in range(3):
                messages.append({"role": "user", "content": f"Question {turn} of conversation {conversation}?"})
                reply = await client.chat.completions.create(
                    model=MODEL, messages=messages, max_tokens=8, temperature=0.0, extra_body=FIXED
                )
                messages.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
    hits = moved(hits_before, series(await scrape(dp2.url), "vllm:prefix_cache_hits_total"))
    queries = moved(queries_before, series(await scrape(dp2.url), "vllm:prefix_cache_queries_total"))
    return sum(hits.values()), sum(queries.values())


async def test_multi_turn_conversations_hit_vllm_s_prefix_cache_more_through_sbs_than_round_robin(
    dp2: Server,
) -> None:
    """sbs keeps a conversation on the DP rank that holds its earlier turns (the gateway's prefix index); round
    robin alternates ranks, so every other turn finds nothing of its conversation cached. vLLM's own counters
    judge. Each policy gets its own conversations (other system prompts), so neither profits from the other's."""
    rates = {}
    for policy, offset in (("round_robin", 0), ("sbs", 100)):
        async with gateway(policy, engine_config("dp2", dp2)) as url:
            hits, queries = await multi_turn_prefix_hits_from(url, dp2, offset)
        assert queries > 0
        rates[policy] = hits / queries
    assert rates["sbs"] > rates["round_robin"] + 0.1, rates
