"""Responses affinity across two real vLLM servers, shown by the engines' own counters.

Two single-rank vLLM servers, engines ``a`` and ``b``, each with its store on (``VLLM_ENABLE_RESPONSES_API_STORE=1``;
a stored response lives in that server's API process, vLLM 0.32 ``entrypoints/openai/responses/serving.py``), behind
the gateway with ``round_robin``, which spreads new responses over both. Conversations of a create, a
``previous_response_id`` follow-up, a streamed follow-up and retrieves, one call at a time, through the official
``openai`` client. After every generating call the test reads each server's ``vllm:request_success_total`` (vLLM 0.32
``v1/metrics/loggers.py``, one per finished request, any finish reason) and the gateway's
``gateway_dispatched_requests_total``: exactly one server and the gateway's count for that same engine moved by one.
The create's engine is the conversation's home; both follow-ups must move the home's counter. A follow-up on the
other server would be answered 404 by vLLM (checked directly at the end), so this fails without affinity.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from scripts.real_vllm import Server, launch, stop, wait_healthy
from tests.real_vllm.support import engine_config, gateway, scrape, series, until

pytestmark = pytest.mark.real_vllm

MODEL = "tiny"
"""The random-weight model: only where each request runs matters here, not its text."""
ENGINES = ("a", "b")
CONVERSATIONS = 4
TOKENS = 8
SERVED = "vllm:request_success_total"
PLACED = "gateway_dispatched_requests_total"


@pytest.fixture(scope="module")
def servers(vllm_installed: None) -> Iterator[dict[str, Server]]:
    """Two single-rank servers with their store on, each on its own CPU."""
    started: list[Server] = []
    try:
        for cpu in range(len(ENGINES)):
            started.append(
                launch(MODEL, first_cpu=cpu, max_num_seqs=4, extra_env={"VLLM_ENABLE_RESPONSES_API_STORE": "1"})
            )
        wait_healthy(started)
        yield dict(zip(ENGINES, started, strict=True))
    finally:
        stop(started)


Counts = tuple[dict[str, float], dict[str, float]]
"""Requests finished by each server (``vllm:request_success_total``) and placed on each engine by the gateway
(``gateway_dispatched_requests_total``), by engine name."""


def counter(servers: dict[str, Server], gateway_url: str) -> Callable[[], Awaitable[Counts]]:
    async def read() -> Counts:
        served = {name: sum(series(await scrape(s.url), SERVED).values()) for name, s in servers.items()}
        placed = series(await scrape(gateway_url), PLACED)
        return served, {name: placed.get(name, 0.0) for name in servers}

    return read


async def one_call(read: Callable[[], Awaitable[Counts]], call: Callable[[], Awaitable[Any]]) -> tuple[Any, str]:
    """Run ``call`` (one generating request) alone; return its result and the one engine whose server finished it,
    after checking that the gateway counted it on that same engine."""
    served0, placed0 = await read()
    result = await call()

    def moved(counts: Counts) -> bool:
        # vLLM counts a request when its engine core's last output is processed, which may follow the answer
        return sum(counts[0].values()) - sum(served0.values()) >= 1

    served1, placed1 = await until(read, moved, "a server to count the request")
    served = {e: served1[e] - served0[e] for e in ENGINES if served1[e] != served0[e]}
    placed = {e: placed1[e] - placed0[e] for e in ENGINES if placed1[e] != placed0[e]}
    assert len(served) == 1 and list(served.values()) == [1.0], f"one request, one server; served {served}"
    assert placed == served, f"gateway placed {placed}, servers finished {served}"
    return result, next(iter(served))


async def test_follow_ups_and_retrieves_stay_on_the_engine_that_stored_the_response(
    servers: dict[str, Server],
) -> None:
    async with gateway("round_robin", *(engine_config(n, s) for n, s in servers.items())) as url:
        read = counter(servers, url)
        start_served, start_placed = await read()
        homes: list[str] = []
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
            for i in range(CONVERSATIONS):

                async def create(i: int = i) -> Any:
                    return await client.responses.create(
                        model=MODEL, input=f"Conversation {i}: name three colours.", max_output_tokens=TOKENS
                    )

                first, home = await one_call(read, create)
                homes.append(home)

                async def follow(prev: str = first.id) -> Any:
                    return await client.responses.create(
                        model=MODEL, input="And three more.", previous_response_id=prev, max_output_tokens=TOKENS
                    )

                second, where = await one_call(read, follow)
                assert where == home, f"conversation {i}: follow-up on {where}, its response is stored on {home}"
                assert second.previous_response_id == first.id and second.usage is not None
                assert first.usage is not None and second.usage.input_tokens > first.usage.input_tokens

                async def streamed(prev: str = second.id) -> list[Any]:
                    stream = await client.responses.create(
                        model=MODEL,
                        input="Once more.",
                        previous_response_id=prev,
                        max_output_tokens=TOKENS,
                        stream=True,
                    )
                    return [event async for event in stream]

                events, where = await one_call(read, streamed)
                assert where == home, f"conversation {i}: streamed follow-up on {where}, stored on {home}"
                types = [e.type for e in events]
                assert types[0] == "response.created" and "error" not in types
                assert types[-1] in ("response.completed", "response.incomplete")
                third = events[-1].response
                assert third.previous_response_id == second.id

                for stored in (first, second, third):
                    again = await client.responses.retrieve(stored.id)
                    assert again.id == stored.id and again.output_text == stored.output_text
        end_served, end_placed = await read()

    assert set(homes) == set(ENGINES), f"new responses should go to both engines, went to {homes}"
    expected = {e: 3.0 * homes.count(e) for e in ENGINES}  # a create and two follow-ups per conversation
    assert {e: end_served[e] - start_served[e] for e in ENGINES} == expected
    assert {e: end_placed[e] - start_placed[e] for e in ENGINES} == expected
    # the check is not vacuous: the other server does not have the conversation (the last one's create here)
    home = homes[-1]
    other = next(e for e in ENGINES if e != home)
    async with httpx.AsyncClient(timeout=30.0) as http:
        reply = await http.post(
            servers[other].url + "/v1/responses",
            json={"model": MODEL, "input": "Hello?", "previous_response_id": first.id, "max_output_tokens": TOKENS},
        )
    assert reply.status_code == 404, f"{other} answered {reply.status_code} for a response stored on {home}"
