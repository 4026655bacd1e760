"""The simulated SGLang/vLLM engine over HTTP: OpenAI shapes, SSE, rank pinning, errors, metrics, aborts."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.sim.mock_engine.app import MockEngineConfig, create_mock_engine_app, mock_engine_server
from gateway.sim.mock_engine.protocol import Flavor, natural_length

FLAVORS: tuple[Flavor, ...] = ("vllm", "sglang")
MODEL = "deepseek-v3"
FAST = 1000.0  # engine seconds per wall second
POLLS = 500  # bounded polling: iterations of POLL_S
POLL_S = 0.01


@asynccontextmanager
async def engine_client(flavor: Flavor, dp_size: int = 4, speed: float = FAST) -> AsyncIterator[httpx.AsyncClient]:
    app = create_mock_engine_app(MockEngineConfig(flavor, dp_size, speed=speed))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://engine") as client,
    ):
        yield client


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hello there, engine"}], **extra}


def completion_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Hello there, engine", **extra}


def sse_payloads(text: str) -> list[Any]:
    events = text.split("\n\n")
    assert events[-1] == ""
    assert all(e.startswith("data: ") for e in events[:-1])
    return [e.removeprefix("data: ") for e in events[:-1]]


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels``."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(found) == 1, (name, labels, found)
    return found[0]


async def post_pinned(
    client: httpx.AsyncClient, flavor: Flavor, path: str, body: dict[str, Any], rank: object
) -> httpx.Response:
    """POST pinned to a DP rank the flavour's way: vLLM by header, SGLang by body field."""
    if flavor == "vllm":
        return await client.post(path, json=body, headers={"X-data-parallel-rank": str(rank)})
    return await client.post(path, json={**body, "routed_dp_rank": rank})


# --- non-streaming ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_chat_completion_object(flavor: Flavor) -> None:
    async with engine_client(flavor) as client:
        response = await client.post("/v1/chat/completions", json=chat_body(max_tokens=5, ignore_eos=True))
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert (body["object"], body["model"]) == ("chat.completion", MODEL)
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": " tok" * 5}
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_text_completion_object(flavor: Flavor) -> None:
    async with engine_client(flavor) as client:
        response = await client.post("/v1/completions", json=completion_body(max_tokens=3, ignore_eos=True))
    body = response.json()
    assert body["id"].startswith("cmpl-")
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == " tok tok tok"
    assert body["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(
    ("extra", "expected_tokens", "finish_reason"),
    [
        ({"max_tokens": 37, "ignore_eos": True}, 37, "length"),
        ({"max_completion_tokens": 12, "ignore_eos": True}, 12, "length"),
        ({"max_tokens": 4}, 4, "length"),  # natural length is >= 16
        ({"max_tokens": 1000}, None, "stop"),  # natural length, 16..256
        ({"max_tokens": 1000, "min_tokens": 300}, 300, "stop"),
    ],
)
async def test_output_length(extra: dict[str, Any], expected_tokens: int | None, finish_reason: str) -> None:
    body = chat_body(**extra)
    if expected_tokens is None:
        expected_tokens = natural_length(body, seed=0)
        assert 16 <= expected_tokens <= 256
    async with engine_client("vllm") as client:
        first = (await client.post("/v1/chat/completions", json=body)).json()
        again = (await client.post("/v1/chat/completions", json=body)).json()
    assert first["usage"]["completion_tokens"] == expected_tokens
    assert again["usage"] == first["usage"]
    assert first["choices"][0]["finish_reason"] == finish_reason


async def test_default_max_tokens_is_256() -> None:
    async with engine_client("sglang") as client:
        body = (await client.post("/v1/completions", json=completion_body(ignore_eos=True))).json()
    assert body["usage"]["completion_tokens"] == 256


# --- streaming -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_chat_stream_chunks(flavor: Flavor) -> None:
    body = chat_body(max_tokens=4, ignore_eos=True, stream=True, stream_options={"include_usage": True})
    async with engine_client(flavor) as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    tokens, final, usage = chunks[:4], chunks[4], chunks[5]
    assert tokens[0]["choices"][0]["delta"] == {"role": "assistant", "content": " tok"}
    assert [c["choices"][0]["delta"] for c in tokens[1:]] == [{"content": " tok"}] * 3
    assert all(c["choices"][0]["finish_reason"] is None for c in tokens)
    assert final["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_completion_stream_without_usage(flavor: Flavor) -> None:
    body = completion_body(max_tokens=2, ignore_eos=True, stream=True)
    async with engine_client(flavor) as client:
        response = await client.post("/v1/completions", json=body)
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert [c["choices"][0]["text"] for c in chunks] == [" tok", " tok", ""]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks)


# --- rank pinning ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, 2, 3])
async def test_vllm_pinned_rank_counters_move(rank: int) -> None:
    async with engine_client("vllm") as client:
        body = completion_body(max_tokens=6, ignore_eos=True)
        response = await post_pinned(client, "vllm", "/v1/completions", body, rank)
        assert response.status_code == 200
        samples = await scrape(client)
    for engine in range(4):
        generated = sample(samples, "vllm:generation_tokens_total", engine=str(engine), model_name=MODEL)
        succeeded = sample(samples, "vllm:request_success_total", engine=str(engine), finished_reason="length")
        assert (generated, succeeded) == ((6.0, 1.0) if engine == rank else (0.0, 0.0))


@pytest.mark.parametrize("field", ["routed_dp_rank", "data_parallel_rank"])
async def test_sglang_pinned_rank_gauges_move(field: str) -> None:
    async with engine_client("sglang", speed=1.0) as client:
        body = completion_body(max_tokens=100_000, ignore_eos=True, **{field: 1})
        task = asyncio.create_task(client.post("/v1/completions", json=body))
        for _ in range(POLLS):
            samples = await scrape(client)
            if sample(samples, "sglang:num_running_reqs", dp_rank="1") == 1.0:
                break
            await asyncio.sleep(POLL_S)
        assert [sample(samples, "sglang:num_running_reqs", dp_rank=str(r)) for r in range(4)] == [0, 1, 0, 0]
        assert sample(samples, "sglang:num_used_tokens", dp_rank="1") > 0
        loads = (await client.get("/get_load")).json()
        assert [entry["num_reqs"] for entry in loads] == [0, 1, 0, 0]
        v1_loads = (await client.get("/v1/loads", params={"include": "core"})).json()["loads"]
        assert [entry["num_running_reqs"] for entry in v1_loads] == [0, 1, 0, 0]
        task.cancel()  # the in-process client goes away: the engine aborts the request
        with pytest.raises(asyncio.CancelledError):
            await task
        samples = await scrape(client)
    assert sample(samples, "sglang:num_running_reqs", dp_rank="1") == 0.0
    assert sample(samples, "sglang:num_used_tokens", dp_rank="1") == 0.0
    assert sample(samples, "sglang:num_aborted_requests_total") == 1.0


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("rank", [4, -1, "one", 1.5])
async def test_bad_rank_pin_is_400(flavor: Flavor, rank: object) -> None:
    if flavor == "vllm" and rank == 1.5:
        rank = "1.5"
    async with engine_client(flavor) as client:
        response = await post_pinned(client, flavor, "/v1/chat/completions", chat_body(), rank)
    assert response.status_code == 400
    body = response.json()
    if flavor == "vllm":
        assert set(body) == {"error"}
        assert body["error"]["type"] == "BadRequestError"
        assert body["error"]["code"] == 400
        assert "message" in body["error"] and "param" in body["error"]
    else:
        assert body["object"] == "error"
        assert (body["type"], body["code"]) == ("BadRequestError", 400)
        assert "message" in body


# --- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_unknown_model_is_404(flavor: Flavor) -> None:
    async with engine_client(flavor) as client:
        response = await client.post("/v1/chat/completions", json={**chat_body(), "model": "gpt-x"})
    assert response.status_code == 404
    error = {"message": "The model `gpt-x` does not exist.", "type": "NotFoundError", "param": "model", "code": 404}
    expected = {"error": error} if flavor == "vllm" else {"object": "error", **error}
    assert response.json() == expected


@pytest.mark.parametrize(
    ("path", "content"),
    [
        ("/v1/chat/completions", b"not json"),
        ("/v1/chat/completions", b"[1, 2]"),
        ("/v1/chat/completions", json.dumps({"messages": []}).encode()),
        ("/v1/completions", json.dumps({"prompt": 3}).encode()),
        ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 0}).encode()),
        ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": "9"}).encode()),
        ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 5, "min_tokens": 6}).encode()),
        ("/v1/completions", json.dumps({"prompt": "x", "stream": "yes"}).encode()),
        ("/v1/completions", json.dumps({"prompt": "x", "n": 0}).encode()),
        ("/v1/completions", json.dumps({"prompt": "x", "n": 17}).encode()),
        ("/v1/completions", json.dumps({"prompt": "x", "logprobs": 21}).encode()),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "logprobs": 1}).encode()),
        ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 131_072}).encode()),
    ],
)
async def test_invalid_requests_are_400(path: str, content: bytes) -> None:
    async with engine_client("vllm") as client:
        response = await client.post(path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "BadRequestError"


async def test_requests_without_lifespan_are_503() -> None:
    app = create_mock_engine_app(MockEngineConfig("vllm", 2))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://engine") as client:
        assert (await client.post("/v1/completions", json=completion_body())).status_code == 503
        assert (await client.get("/health")).status_code == 503


# --- other endpoints -------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_models_and_health(flavor: Flavor) -> None:
    async with engine_client(flavor) as client:
        models = (await client.get("/v1/models")).json()
        health = await client.get("/health")
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in models["data"]] == [(MODEL, "model", flavor)]
    assert health.status_code == 200


async def test_sglang_extra_endpoints() -> None:
    async with engine_client("sglang", dp_size=2) as client:
        for path in ("/health_generate", "/server_info", "/get_server_info", "/model_info", "/v1/loads", "/get_load"):
            assert (await client.get(path)).status_code == 200, path
        info = (await client.get("/server_info")).json()
        loads = (await client.get("/get_load")).json()
    assert (info["dp_size"], info["model_path"], info["served_model_name"]) == (2, MODEL, MODEL)
    assert loads == [{"dp_rank": r, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0} for r in range(2)]


CORE_LOAD_FIELDS = {
    "dp_rank",
    "num_running_reqs",
    "num_waiting_reqs",
    "num_waiting_uncached_tokens",
    "num_used_tokens",
    "num_total_tokens",
    "max_total_num_tokens",
    "max_running_requests",
    "token_usage",
    "gen_throughput",
    "cache_hit_rate",
    "utilization",
}
"""SGLang 0.5.23's core ``/v1/loads`` fields (``LoadSnapshot.to_dict``)."""


@pytest.mark.parametrize(
    ("include", "sections"),
    [
        ("core", set()),
        ("core,disagg,queues,memory", {"disaggregation", "queues", "memory"}),  # what smg 1.13 asks for
        (None, {"memory", "speculative", "lora", "disaggregation", "queues"}),
    ],
)
async def test_sglang_v1_loads_shape(include: str | None, sections: set[str]) -> None:
    async with engine_client("sglang", dp_size=2) as client:
        params = {} if include is None else {"include": include}
        body = (await client.get("/v1/loads", params=params)).json()
    assert set(body) == {"timestamp", "version", "loads"}
    assert [load["dp_rank"] for load in body["loads"]] == [0, 1]
    for load in body["loads"]:
        assert set(load) == CORE_LOAD_FIELDS | sections
        assert (load["num_running_reqs"], load["num_waiting_reqs"], load["token_usage"]) == (0, 0, 0.0)
        assert load["max_total_num_tokens"] > 0 and load["max_running_requests"] > 0
        if "queues" in sections:
            assert load["queues"] == {"waiting": 0, "grammar": 0, "paused": 0, "retracted": 0}
        if "disaggregation" in sections:
            assert load["disaggregation"]["mode"] == "null"


async def test_sglang_v1_loads_counts_a_pinned_request_and_filters_by_rank() -> None:
    async with engine_client("sglang", dp_size=2, speed=1e-6) as client:  # a step lasts for ever: the request stays
        body = completion_body(prompt="word " * 400, max_tokens=4, data_parallel_rank=1)
        task = asyncio.create_task(client.post("/v1/completions", json=body))
        for _ in range(POLLS):
            loads = (await client.get("/v1/loads", params={"include": "core"})).json()["loads"]
            if loads[1]["num_waiting_reqs"] + loads[1]["num_running_reqs"] == 1:
                break
            await asyncio.sleep(POLL_S)
        only_rank_1 = (await client.get("/v1/loads", params={"dp_rank": 1})).json()["loads"]
        out_of_range = (await client.get("/v1/loads", params={"dp_rank": 2})).json()["loads"]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert [load["num_waiting_reqs"] + load["num_running_reqs"] for load in loads] == [0, 1]
    rank_1 = loads[1]
    assert rank_1["num_used_tokens"] + rank_1["num_waiting_uncached_tokens"] > 0
    assert rank_1["num_total_tokens"] == rank_1["num_used_tokens"] + rank_1["num_waiting_uncached_tokens"]
    assert [load["dp_rank"] for load in only_rank_1] == [1]
    assert out_of_range == []


async def test_sglang_v1_loads_refuses_an_unknown_section() -> None:
    async with engine_client("sglang") as client:
        response = await client.get("/v1/loads", params={"include": "core,bogus"})
    assert response.status_code == 400
    assert "bogus" in response.json()["detail"]


async def test_sim_requests_counts_pinned_and_placed_ranks_and_load_polls() -> None:
    async with engine_client("sglang", dp_size=2) as client:
        for body in (completion_body(max_tokens=2, data_parallel_rank=1), completion_body(max_tokens=2)):
            assert (await client.post("/v1/completions", json=body)).status_code == 200
        for path in ("/v1/loads", "/v1/loads", "/get_load", "/metrics", "/server_info"):
            await client.get(path)
        seen = (await client.get("/_sim/requests")).json()
    assert seen["pinned"] == [0, 1]
    assert sum(seen["placed"]) == 1
    assert seen["polls"] == {"/v1/loads": 2, "/get_load": 1, "/metrics": 1}


async def test_vllm_has_no_sglang_endpoints() -> None:
    async with engine_client("vllm") as client:
        assert (await client.get("/v1/loads")).status_code == 404


# --- metrics ---------------------------------------------------------------------------------------------

VLLM_RANK_LABELS = {"model_name", "engine"}
SGLANG_RANK_LABELS = {"model_name", "engine_type", "tp_rank", "pp_rank", "moe_ep_rank", "dp_rank"}


async def families(flavor: Flavor, dp_size: int) -> dict[str, Any]:
    async with engine_client(flavor, dp_size=dp_size) as client:
        await client.post("/v1/completions", json=completion_body(max_tokens=3, ignore_eos=True))
        text = (await client.get("/metrics")).text
    assert "_created" not in text
    return {f.name: f for f in text_string_to_metric_families(text)}


async def test_vllm_metric_names_and_labels() -> None:
    found = await families("vllm", dp_size=3)
    expected_types = {
        "vllm:num_requests_running": "gauge",
        "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge",
        "vllm:prompt_tokens": "counter",
        "vllm:generation_tokens": "counter",
        "vllm:num_preemptions": "counter",
        "vllm:request_success": "counter",
        "vllm:time_to_first_token_seconds": "histogram",
        "vllm:inter_token_latency_seconds": "histogram",
        "vllm:e2e_request_latency_seconds": "histogram",
        "vllm:iteration_tokens_total": "histogram",
    }
    assert {name: found[name].type for name in expected_types} == expected_types
    for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:prompt_tokens"):
        samples = found[name].samples
        assert {s.labels["engine"] for s in samples} == {"0", "1", "2"}
        assert all(set(s.labels) == VLLM_RANK_LABELS and s.labels["model_name"] == MODEL for s in samples)
    assert {s.name for s in found["vllm:prompt_tokens"].samples} == {"vllm:prompt_tokens_total"}
    reasons = {s.labels["finished_reason"] for s in found["vllm:request_success"].samples}
    assert reasons == {"stop", "length", "abort", "error"}
    ttft = {s.name for s in found["vllm:time_to_first_token_seconds"].samples}
    assert ttft == {f"vllm:time_to_first_token_seconds_{x}" for x in ("bucket", "count", "sum")}
    counts = [s for s in found["vllm:time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert sum(s.value for s in counts) == 1.0
    assert all(set(s.labels) == VLLM_RANK_LABELS for s in counts)


async def test_sglang_metric_names_and_labels() -> None:
    found = await families("sglang", dp_size=2)
    gauges = [
        "sglang:num_running_reqs",
        "sglang:num_queue_reqs",
        "sglang:token_usage",
        "sglang:num_used_tokens",
        "sglang:max_total_num_tokens",
        "sglang:gen_throughput",
        "sglang:cache_hit_rate",
    ]
    for name in gauges:
        assert found[name].type == "gauge"
        samples = found[name].samples
        assert all(set(s.labels) == SGLANG_RANK_LABELS for s in samples), name
        assert sorted(s.labels["dp_rank"] for s in samples) == ["0", "1"]
        assert {(s.labels["engine_type"], s.labels["tp_rank"], s.labels["pp_rank"]) for s in samples} == {
            ("unified", "0", "0")
        }
    counters = [
        "sglang:prompt_tokens",
        "sglang:generation_tokens",
        "sglang:num_aborted_requests",
        "sglang:num_requests",
    ]
    for name in counters:
        assert found[name].type == "counter"
        [s] = found[name].samples
        assert s.name == f"{name}_total"
        assert s.labels == {"model_name": MODEL}
    assert found["sglang:generation_tokens"].samples[0].value == 3.0
    assert found["sglang:num_requests"].samples[0].value == 1.0
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        family = found[f"sglang:{name}"]
        assert family.type == "histogram"
        assert all(set(s.labels) <= {"model_name", "le"} for s in family.samples)


# --- client disconnect against a real server -------------------------------------------------------------


@asynccontextmanager
async def real_engine(flavor: Flavor) -> AsyncIterator[str]:
    server = mock_engine_server(MockEngineConfig(flavor, 2, speed=1.0), "127.0.0.1", 0)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(POLLS):
            if server.started:
                break
            await asyncio.sleep(POLL_S)
        assert server.started
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def wait_for(client: httpx.AsyncClient, name: str, value: float, **labels: str) -> dict[Any, float]:
    for _ in range(POLLS):
        samples = await scrape(client)
        if sample(samples, name, **labels) == value:
            return samples
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"{name}{labels} never reached {value}")


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_streaming_client_disconnect_aborts_the_request(flavor: Flavor) -> None:
    body = completion_body(max_tokens=100_000, ignore_eos=True, stream=True)
    async with real_engine(flavor) as url, httpx.AsyncClient(base_url=url) as scraper:
        async with httpx.AsyncClient(base_url=url) as client, client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break  # got the first token; leave mid-stream
        if flavor == "vllm":
            samples = await wait_for(scraper, "vllm:request_success_total", 1.0, finished_reason="abort", engine="0")
            assert sum(sample(samples, "vllm:kv_cache_usage_perc", engine=str(r)) for r in range(2)) == 0.0
            assert sample(samples, "vllm:num_requests_running", engine="0") == 0.0
        else:
            samples = await wait_for(scraper, "sglang:num_aborted_requests_total", 1.0)
            assert sample(samples, "sglang:num_used_tokens", dp_rank="0") == 0.0


async def test_non_streaming_client_disconnect_aborts_the_request() -> None:
    body = completion_body(max_tokens=100_000, ignore_eos=True)
    async with real_engine("vllm") as url, httpx.AsyncClient(base_url=url) as scraper:
        client = httpx.AsyncClient(base_url=url)
        task = asyncio.create_task(client.post("/v1/completions", json=body))
        await wait_for(scraper, "vllm:num_requests_running", 1.0, engine="0")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await client.aclose()
        samples = await wait_for(scraper, "vllm:request_success_total", 1.0, finished_reason="abort", engine="0")
        assert sample(samples, "vllm:kv_cache_usage_perc", engine="0") == 0.0
