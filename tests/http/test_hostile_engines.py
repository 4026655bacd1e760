"""Engines that misbehave on purpose: a ``/metrics`` that is garbage, cut, huge, NaN-laden or never answers, and
SSE streams that are malformed or stop early. The scraper survives them all, dispatch goes on, and only the
client of a broken stream sees an error (a clean error event and ``[DONE]``); the others keep flowing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from gateway.config import EngineConfig, ScrapeConfig, Settings, UpstreamConfig
from gateway.engines import Engine, EngineAdapter, adapter_for
from gateway.engines.client import EngineClient
from gateway.errors import UpstreamError, UpstreamTimeoutError
from gateway.load.scraper import MetricsScraper
from gateway.load.view import LoadView
from gateway.server.stream_end import StreamEnd
from gateway.serving import serve_in_background
from gateway.sim.cluster import running_gateway
from gateway.telemetry import GatewayMetrics
from gateway.types import RankMetrics
from tests.helpers import Respond, make_view, raw_http_server

MODEL = "m"
GOOD_METRICS = 'vllm:num_requests_running{engine="0",model_name="m"} 2\nvllm:num_requests_waiting{engine="1"} 1\n'


def head(length: int | None = None, *, chunked: bool = False) -> bytes:
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}"
    return f"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n{framing}\r\n\r\n".encode()


def whole(body: bytes) -> Respond:
    async def respond(writer: asyncio.StreamWriter) -> None:
        writer.write(head(len(body)) + body)

    return respond


async def short_body(writer: asyncio.StreamWriter) -> None:
    """Declares 10 000 bytes, sends a valid-looking start, then closes."""
    writer.write(head(10_000) + GOOD_METRICS.encode())


async def declared_huge(writer: asyncio.StreamWriter) -> None:
    writer.write(head(10**10))
    await asyncio.sleep(3600)


async def endless(writer: asyncio.StreamWriter) -> None:
    writer.write(head(chunked=True))
    line = b'vllm:num_requests_running{engine="0"} 1\n' * 100
    for _ in range(100_000):
        writer.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
        await writer.drain()


async def silent(writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(3600)


async def dripping(writer: asyncio.StreamWriter) -> None:
    writer.write(head(10_000))
    for _ in range(10_000):
        writer.write(b"#")
        await writer.drain()
        await asyncio.sleep(0.05)


SCRAPE = ScrapeConfig(interval_s=0.05, timeout_s=0.5, max_response_bytes=64 * 1024)

FAILING_METRICS = [
    pytest.param(whole(b"\x00\xff\xfe<html>502 Bad Gateway</html>\n"), UpstreamError, "UTF-8", id="binary-garbage"),
    pytest.param(whole(b"<html><body>502 Bad Gateway</body></html>\n"), None, "", id="html-garbage"),
    pytest.param(whole(GOOD_METRICS.encode()[:-5]), None, "", id="cut-inside-a-line"),
    pytest.param(short_body, UpstreamError, "failed", id="shorter-than-content-length"),
    pytest.param(declared_huge, UpstreamError, "exceeds", id="declared-huge"),
    pytest.param(endless, UpstreamError, "exceeds", id="endless-chunked"),
    pytest.param(silent, UpstreamTimeoutError, "timed out", id="never-answers"),
    pytest.param(dripping, UpstreamTimeoutError, "timed out", id="drips-forever"),
]


def scraper_for(url: str, client: EngineClient) -> tuple[MetricsScraper, LoadView, GatewayMetrics]:
    engine = EngineConfig(name="e", flavor="vllm", url=url, dp_size=2, models=[MODEL])
    view = make_view("e", dp_size=2, model=MODEL, stale_after_s=10)
    metrics = GatewayMetrics()
    return MetricsScraper(client, [Engine.from_config(engine)], view, metrics, SCRAPE), view, metrics


@pytest.mark.parametrize(("respond", "error", "match"), FAILING_METRICS)
async def test_hostile_metrics_fail_the_scrape_and_nothing_else(
    respond: Respond, error: type[Exception] | None, match: str
) -> None:
    async with raw_http_server(respond) as url, EngineClient(UpstreamConfig()) as client:
        if error is not None:  # the transport layer names what went wrong
            with pytest.raises(error, match=match):
                await client.get_text(url + "/metrics", SCRAPE.timeout_s, SCRAPE.max_response_bytes)
        scraper, view, metrics = scraper_for(url, client)
        assert await scraper.once(scraper._engines[0]) is False
        assert view.engine_reachable("e") is False
        assert 'gateway_scrape_errors_total{engine="e"} 1.0' in metrics.render().decode()


async def test_nan_negative_and_out_of_range_figures_never_reach_the_load_view() -> None:
    text = (
        'vllm:num_requests_running{engine="0"} NaN\n'
        'vllm:num_requests_running{engine="1"} -5\n'
        'vllm:num_requests_waiting{engine="1"} 3\n'
        'vllm:num_requests_running{engine="-1"} 9\n'
        'vllm:num_requests_running{engine="7"} 9\n'
        'vllm:kv_cache_usage_perc{engine="0"} +Inf\n'
    )
    async with raw_http_server(whole(text.encode())) as url, EngineClient(UpstreamConfig()) as client:
        scraper, view, _ = scraper_for(url, client)
        assert await scraper.once(scraper._engines[0]) is True
    loads = {load.key.rank: (load.running, load.waiting, load.kv_usage) for load in view.snapshot(0.0)}
    assert loads == {0: (0.0, 0.0, None), 1: (0.0, 3.0, None)}


class ExplodingAdapter(EngineAdapter):
    flavor = "vllm"

    def pin_rank(self, body: dict[str, Any], headers: Any, rank: int) -> None:
        raise NotImplementedError

    def parse_metrics(self, text: str) -> dict[int, RankMetrics]:
        raise KeyError("a parser bug")


async def test_an_unexpected_error_does_not_end_the_scraping_loop() -> None:
    async with raw_http_server(whole(GOOD_METRICS.encode())) as url, EngineClient(UpstreamConfig()) as client:
        engine = EngineConfig(name="e", flavor="vllm", url=url, dp_size=2, models=[MODEL])
        view = make_view("e", dp_size=2, model=MODEL, stale_after_s=10)
        metrics = GatewayMetrics()
        scraper = MetricsScraper(client, [Engine(engine, ExplodingAdapter())], view, metrics, SCRAPE)
        await scraper.start()
        try:
            for _ in range(200):  # bounded: the loop keeps scraping (and failing) on its 50 ms interval
                if 'gateway_scrape_errors_total{engine="e"} 3.0' in metrics.render().decode():
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail(f"the scraping loop stopped:\n{metrics.render().decode()}")
            assert all(not task.done() for task in scraper._tasks.values())
        finally:
            await scraper.stop()


class ThreadRecordingAdapter(EngineAdapter):
    flavor = "vllm"

    def __init__(self) -> None:
        self.threads: list[int] = []

    def pin_rank(self, body: dict[str, Any], headers: Any, rank: int) -> None:
        raise NotImplementedError

    def parse_metrics(self, text: str) -> dict[int, RankMetrics]:
        self.threads.append(threading.get_ident())
        return adapter_for("vllm").parse_metrics(text)


async def test_metrics_are_parsed_off_the_event_loop() -> None:
    """A large body's parsing (milliseconds per 50 KB) must not stall the loop that closes windows."""
    adapter = ThreadRecordingAdapter()
    async with raw_http_server(whole(GOOD_METRICS.encode())) as url, EngineClient(UpstreamConfig()) as client:
        engine = EngineConfig(name="e", flavor="vllm", url=url, dp_size=2, models=[MODEL])
        view = make_view("e", dp_size=2, model=MODEL, stale_after_s=10)
        scraper = MetricsScraper(client, [Engine(engine, adapter)], view, GatewayMetrics(), SCRAPE)
        assert await scraper.once(scraper._engines[0]) is True
    assert len(adapter.threads) == 1 and adapter.threads[0] != threading.get_ident()
    assert {load.key.rank: load.running for load in view.snapshot(0.0)} == {0: 2.0, 1: 0.0}


def engine_with_metrics(metrics: Callable[[Request], Awaitable[Response]]) -> FastAPI:
    """An echoing engine whose ``/metrics`` is ``metrics``."""
    app = FastAPI()

    async def chat(request: Request) -> Response:
        return JSONResponse({"echo_body": await request.json()})

    app.add_api_route("/v1/chat/completions", chat, methods=["POST"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/health", lambda: PlainTextResponse(""), methods=["GET"])
    return app


async def hung_metrics(request: Request) -> Response:
    while (await request.receive())["type"] != "http.disconnect":  # until the scraper's timeout hangs up
        pass
    return PlainTextResponse("")


async def flood_metrics(request: Request) -> Response:
    async def lines() -> AsyncIterator[bytes]:
        for _ in range(100):  # 4 MB, far over the 64 KiB bound (uvicorn may not stop a stream on disconnect)
            yield b'vllm:num_requests_running{engine="0"} 1\n' * 1000

    return StreamingResponse(lines(), media_type="text/plain")


async def garbage_metrics(request: Request) -> Response:
    return PlainTextResponse('{"detail": "no metrics here"}\nvllm:num_requests_running{engine="0" NaN')


@pytest.mark.parametrize("policy", ["sbs", "round_robin"])
@pytest.mark.parametrize("metrics", [hung_metrics, flood_metrics, garbage_metrics])
async def test_hostile_metrics_do_not_block_dispatch(
    policy: str, metrics: Callable[[Request], Awaitable[Response]]
) -> None:
    async with contextlib.AsyncExitStack() as exits:
        url = await exits.enter_async_context(serve_in_background(engine_with_metrics(metrics)))
        settings = Settings(
            policy=policy, engines=[EngineConfig(name="e", flavor="vllm", url=url, dp_size=2, models=[MODEL])]
        )
        settings = settings.model_copy(update={"scrape": SCRAPE})
        gateway_url = await exits.enter_async_context(running_gateway(settings))
        client = await exits.enter_async_context(httpx.AsyncClient(base_url=gateway_url, timeout=10))
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for _ in range(3):  # while scrapes keep failing in the background
            replies = await asyncio.gather(*(client.post("/v1/chat/completions", json=chat) for _ in range(4)))
            assert [r.status_code for r in replies] == [200] * 4, [r.text for r in replies]
        exposition = (await client.get("/metrics")).text
    assert 'gateway_scrapes_total{engine="e",result="error"}' in exposition
    assert 'gateway_scrapes_total{engine="e",result="ok"}' not in exposition


# Streams.


def sse_engine() -> FastAPI:
    """Streams whose ``mode`` body field picks how they end."""
    app = FastAPI()

    async def chat(request: Request) -> Response:
        mode = (await request.json()).get("mode", "ok")

        async def events() -> AsyncIterator[bytes]:
            for i in range(4):
                yield f"data: {json.dumps({'i': i})}\n\n".encode()
                await asyncio.sleep(0.01)
            if mode == "ok":
                yield b"data: [DONE]\n\n"
            elif mode == "garbage":
                yield b"\x00\xff<html>not an event</html>"
            elif mode == "cut-event":
                yield b'data: {"i": 4, "choi'
            elif mode == "reset":
                await asyncio.sleep(0.1)  # let the events reach the gateway before the connection breaks
                raise RuntimeError("engine died")
            # "no-done": a clean end without the end marker

        return StreamingResponse(events(), media_type="text/event-stream")

    app.add_api_route("/v1/chat/completions", chat, methods=["POST"])
    app.add_api_route("/metrics", lambda: PlainTextResponse(""), methods=["GET"])
    app.add_api_route("/health", lambda: PlainTextResponse(""), methods=["GET"])
    return app


async def read_events(client: httpx.AsyncClient, mode: str) -> list[str]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "mode": mode}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        raw = b"".join([chunk async for chunk in r.aiter_bytes()])
    return [event for event in raw.decode("utf-8", "replace").split("\n\n") if event]


@pytest.mark.parametrize("mode", ["garbage", "cut-event", "no-done", "reset"])
async def test_a_broken_stream_ends_with_an_error_event_for_its_client_only(mode: str) -> None:
    async with contextlib.AsyncExitStack() as exits:
        url = await exits.enter_async_context(serve_in_background(sse_engine()))
        settings = Settings(
            policy="round_robin", engines=[EngineConfig(name="e", flavor="vllm", url=url, dp_size=2, models=[MODEL])]
        )
        gateway_url = await exits.enter_async_context(running_gateway(settings))
        client = await exits.enter_async_context(httpx.AsyncClient(base_url=gateway_url, timeout=10))
        broken, *others = await asyncio.gather(
            read_events(client, mode), *(read_events(client, "ok") for _ in range(3))
        )
    expected_ok = [f"data: {json.dumps({'i': i})}" for i in range(4)] + ["data: [DONE]"]
    assert others == [expected_ok] * 3
    assert broken[:4] == expected_ok[:4]
    error = json.loads(broken[-2].removeprefix("data: "))
    assert set(error["error"]) == {"message", "type", "param", "code"}, broken
    assert error["error"]["type"] == "upstream_error"
    assert broken[-1] == "data: [DONE]"


@pytest.mark.parametrize(
    ("chunks", "done", "separator"),
    [
        ([b"data: {}\n\n", b"data: [DONE]\n\n"], True, b""),
        ([b"data: {}\n\ndata: [DO", b"NE]\n\n"], True, b""),
        ([b"data: {}\n\n"], False, b""),
        ([b"data: {}\r\n\r\n"], False, b""),
        ([b'data: {"a'], False, b"\n\n"),
        ([b"data: [DONE]\n\n", b"data: {}\n\n"], False, b""),
        ([], False, b""),
    ],
)
def test_stream_end(chunks: list[bytes], done: bool, separator: bytes) -> None:
    end = StreamEnd()
    for chunk in chunks:
        end.feed(chunk)
    assert end.done is done
    closing = end.error_events("broke", code=502)
    assert closing.startswith(separator + b"data: {") and closing.endswith(b"\n\ndata: [DONE]\n\n"), closing
    event = json.loads(closing.removeprefix(separator).split(b"\n\n")[0].removeprefix(b"data: "))
    assert event == {"error": {"message": "broke", "type": "upstream_error", "param": None, "code": 502}}
