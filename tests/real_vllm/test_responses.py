"""The Responses API through the gateway against a real vLLM (its store on: ``VLLM_ENABLE_RESPONSES_API_STORE=1``)
with the official ``openai`` client: one create, one ``previous_response_id`` follow-up and one retrieve, then a
streamed follow-up that the gateway relays to its terminal event without an error of its own."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import openai
import pytest

from scripts.real_vllm import Server, launch, stop, wait_healthy
from tests.real_vllm.support import engine_config, gateway

pytestmark = pytest.mark.real_vllm

MODEL = "tiny"
"""The random-weight model: only the engine's behaviour matters here, not its text."""


@pytest.fixture(scope="module")
def server(vllm_installed: None) -> Iterator[Server]:
    started = launch(MODEL, extra_env={"VLLM_ENABLE_RESPONSES_API_STORE": "1"})
    try:
        wait_healthy([started])
        yield started
    finally:
        stop([started])


@pytest.fixture
async def client(server: Server) -> AsyncIterator[openai.AsyncOpenAI]:
    async with gateway("sbs", engine_config("vllm", server)) as url:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        yield client
        await client.close()


async def test_create_follow_up_and_retrieve(client: openai.AsyncOpenAI) -> None:
    first = await client.responses.create(model=MODEL, input="Name three colours.", max_output_tokens=8)
    assert first.id.startswith("resp_") and first.usage is not None and first.usage.output_tokens > 0
    follow = await client.responses.create(
        model=MODEL, input="And three more.", previous_response_id=first.id, max_output_tokens=8
    )
    assert follow.previous_response_id == first.id
    assert follow.usage is not None and follow.usage.input_tokens > first.usage.input_tokens  # the history came too
    again = await client.responses.retrieve(first.id)
    assert again.id == first.id and again.output_text == first.output_text
    stream = await client.responses.create(
        model=MODEL, input="Once more.", previous_response_id=follow.id, max_output_tokens=8, stream=True
    )
    types = [event.type async for event in stream]
    assert types[0] == "response.created" and "response.output_text.delta" in types
    assert types[-1] in ("response.completed", "response.incomplete") and "error" not in types
