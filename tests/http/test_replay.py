"""Trace-replay client against a fake OpenAI streaming server, plus the pure SSE decoder and summary maths."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.replay.client import ReplayError, replay, request_body, request_prompt, run_bench
from gateway.replay.sse import SSEDecoder
from gateway.sim.cluster import free_port
from gateway.tokens import count_prompt_tokens
from gateway.workload.stats import (
    ReplayResult,
    RequestRecord,
    distribution,
    format_table,
    percentile,
    summarize,
)
from gateway.workload.traces import TraceRequest

REJECT = 13
"""``max_tokens`` the fake server answers with HTTP 400."""
STREAM_ERROR = 17
"""``max_tokens`` the fake server answers with one token then an SSE error event."""
HANG = 19
"""``max_tokens`` the fake server sits on until released (timeout tests)."""


@dataclass
class FakeOpenAI:
    """A fake OpenAI-compatible engine: streams ``max_tokens`` one-token chunks, usage, then ``[DONE]``."""

    usage: bool = True
    crlf: bool = False
    fragment: bool = False
    bodies: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_post("/v1/completions", self.generate)
        return app

    async def models(self, request: web.Request) -> web.Response:
        self.paths.append(request.path)
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        self.paths.append(request.path)
        body = await request.json()
        self.bodies.append(body)
        n = body["max_tokens"]
        if n == REJECT:
            error = {"message": "prompt too long", "type": "BadRequestError", "code": 400}
            return web.json_response({"error": error}, status=400)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chat = request.path.endswith("/chat/completions")
        text = "é" if self.fragment else "t"
        await self.send(resp, {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        if n == HANG:
            await self.release.wait()
            return resp
        for i in range(n):
            choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            await self.send(resp, {"id": f"c{i}", "choices": [choice]})
            if n == STREAM_ERROR:
                await self.send(resp, {"error": {"message": "engine died", "type": "InternalServerError"}})
                return resp
        if self.usage:
            usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
            await self.send(resp, {"choices": [], "usage": usage})
        await self.send(resp, "[DONE]")
        return resp

    async def send(self, resp: web.StreamResponse, event: dict[str, Any] | str) -> None:
        data = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)
        end = "\r\n" if self.crlf else "\n"
        raw = f": keep-alive{end}data: {data}{end}{end}".encode()
        if not self.fragment:
            await resp.write(raw)
            return
        for i in range(0, len(raw), 3):  # splits lines, CRLF pairs and the 2-byte "é"
            await resp.write(raw[i : i + 3])


@pytest.fixture
def fake() -> FakeOpenAI:
    return FakeOpenAI()


@pytest.fixture
async def server(fake: FakeOpenAI) -> AsyncIterator[str]:
    async with TestServer(fake.app(), host="127.0.0.1") as srv:
        yield str(srv.make_url("")).rstrip("/")
        fake.release.set()


def burst(*output_tokens: int, prompt_tokens: int = 8) -> list[TraceRequest]:
    return [TraceRequest(0.0, prompt_tokens, n) for n in output_tokens]


async def test_replay_counts_successes_and_failures(server: str, fake: FakeOpenAI) -> None:
    result = await replay(server, burst(5, REJECT, STREAM_ERROR, 3, 1), progress=False)
    summary = summarize(result)

    assert result.model == "fake-model" and fake.paths[0] == "/v1/models"
    assert (summary["launched"], summary["completed"], summary["failed"]) == (5, 3, 2)
    assert summary["failures"] == {"HTTP 400": 1, "stream error": 1}
    assert summary["failure_examples"] == {"HTTP 400": "prompt too long", "stream error": "engine died"}
    by_tokens = {r.requested_output_tokens: r for r in result.records}
    for n in (5, 3, 1):
        record = by_tokens[n]
        assert record.ok and record.error is None
        assert record.output_tokens == n
        assert len(record.itl_s) == n - 1
        assert record.ttft_s is not None and record.e2e_s is not None
        assert 0 <= record.ttft_s <= record.e2e_s
    assert by_tokens[STREAM_ERROR].ttft_s is not None  # a token arrived before the error
    assert summary["total_output_tokens"] == 9
    assert summary["ttft_s"]["p50"] is not None and summary["tpot_s"]["max"] is not None


async def test_request_bodies_ask_for_exact_lengths(server: str, fake: FakeOpenAI) -> None:
    await replay(server, [TraceRequest(0.0, 40, 5), TraceRequest(0.0, 2, 1)], model="m", progress=False)

    assert "/v1/models" not in fake.paths
    assert len(fake.bodies) == 2
    for body in fake.bodies:
        n = body["max_tokens"]
        assert body["model"] == "m"
        assert body["min_tokens"] == n and body["ignore_eos"] is True
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert count_prompt_tokens(body) == (40 if n == 5 else 2)
        assert [m["role"] for m in body["messages"]] == ["user"]


@pytest.mark.parametrize("fake", [FakeOpenAI(usage=False, crlf=True, fragment=True)])
async def test_completions_without_usage_over_fragmented_crlf_stream(server: str, fake: FakeOpenAI) -> None:
    result = await replay(server + "/v1/", burst(4, 2), endpoint="completions", progress=False)

    assert [r.ok for r in result.records] == [True, True]
    assert [r.output_tokens for r in result.records] == [4, 2]  # counted chunks, no usage chunk
    assert all("prompt" in b and "messages" not in b for b in fake.bodies)
    assert set(fake.paths) == {"/v1/models", "/v1/completions"}


async def test_duration_stops_launching(server: str, fake: FakeOpenAI) -> None:
    trace = [TraceRequest(t, 8, 2) for t in (0.0, 0.0, 0.0, 30.0, 60.0)]
    result = await replay(server, trace, duration_s=1.0, progress=False)

    assert len(result.records) == 3 and len(fake.bodies) == 3
    summary = summarize(result)
    assert summary["completed"] == 3
    assert summary["config"]["trace_requests"] == 5
    assert summary["config"]["duration_limit_s"] == 1.0


async def test_rate_scale_divides_arrivals(server: str) -> None:
    trace = [TraceRequest(t, 8, 1) for t in (0.0, 20.0, 40.0)]
    result = await replay(server, trace, rate_scale=1000.0, progress=True)

    assert [r.scheduled_at_s for r in result.records] == [0.0, 0.02, 0.04]
    assert all(r.sent_at_s >= r.scheduled_at_s for r in result.records)
    assert summarize(result)["completed"] == 3


async def test_timeout_is_a_failure(server: str) -> None:
    result = await replay(server, burst(HANG, 2), model="m", timeout_s=0.2, progress=False)

    assert summarize(result)["failures"] == {"timeout": 1}
    assert [r.ok for r in result.records] == [False, True]


async def test_unreachable_server() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = await replay(url, burst(1), model="m", progress=False)
    assert summarize(result)["failures"] == {"ClientConnectorError": 1}
    with pytest.raises(ReplayError, match="/v1/models"):
        await replay(url, burst(1), progress=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"duration_s": 0.0}, "duration_s"),
        ({"timeout_s": -1.0}, "timeout_s"),
        ({"endpoint": "embed"}, "endpoint"),
    ],
)
async def test_replay_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        await replay("http://127.0.0.1:1", burst(1), model="m", progress=False, **kwargs)


async def test_run_bench_prints_and_writes_json(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace_file = tmp_path / "t.jsonl"
    rows = [{"timestamp": ms, "input_length": 16, "output_length": 3} for ms in (0, 0, 1000, 2000)]
    trace_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "results" / "summary.json"

    # run_bench owns its event loop (asyncio.run): give it a thread while this loop serves the fake.
    summary = await asyncio.to_thread(
        run_bench, server, trace_file, output=out, start_s=1.0, max_requests=1, progress=False
    )

    assert json.loads(out.read_text(encoding="utf-8")) == summary
    assert summary["completed"] == 1 and summary["total_output_tokens"] == 3
    assert summary["total_input_tokens"] == 16
    assert summary["config"]["trace"] == str(trace_file)
    assert (summary["config"]["start_s"], summary["config"]["max_requests"]) == (1.0, 1)
    printed = capsys.readouterr().out
    assert "TTFT" in printed and "output throughput" in printed


# --- pure parts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunks", "events"),
    [
        ([b"data: a\n\n"], ["a"]),
        ([b"data: a\r\n\r\ndata:b\n\n"], ["a", "b"]),
        ([b"da", b'ta: {"x"', b": 1}\n", b"\n"], ['{"x": 1}']),
        ([b": comment\nevent: error\nid: 7\ndata: a\ndata: b\n\n"], ["a\nb"]),
        ([b"data: \xc3", b"\xa9\n\n"], ["é"]),
        ([b"\n\ndata: [DONE]"], ["[DONE]"]),  # last event without its blank line, flushed on close
    ],
)
def test_sse_decoder(chunks: list[bytes], events: list[str]) -> None:
    decoder = SSEDecoder()
    out = [event for chunk in chunks for event in decoder.feed(chunk)]
    assert out + decoder.close() == events


@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 4096])
def test_request_prompt_has_exact_estimate_and_unique_start(n: int) -> None:
    assert count_prompt_tokens({"prompt": request_prompt(7, n)}) == n
    assert count_prompt_tokens(request_body("chat", "m", 7, n, 1)) == n
    if n >= 3:
        assert request_prompt(7, n)[:8] != request_prompt(8, n)[:8]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], {"mean": None, "p50": None, "p90": None, "p99": None, "max": None}),
        ([5.0], {"mean": 5.0, "p50": 5.0, "p90": 5.0, "p99": 5.0, "max": 5.0}),
        ([4.0, 1.0, 3.0, 2.0], {"mean": 2.5, "p50": 2.5, "p90": 3.7, "p99": 3.97, "max": 4.0}),
        ([0.0, 10.0], {"mean": 5.0, "p50": 5.0, "p90": 9.0, "p99": 9.9, "max": 10.0}),
        (list(range(1, 102)), {"mean": 51.0, "p50": 51.0, "p90": 91.0, "p99": 100.0, "max": 101.0}),
    ],
)
def test_distribution(values: list[float], expected: dict[str, float | None]) -> None:
    assert distribution(values) == pytest.approx(expected)


def test_percentile_matches_statistics_inclusive() -> None:
    rng = random.Random(42)
    values = sorted(rng.expovariate(1.0) for _ in range(257))
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    for pct in (1, 25, 50, 90, 99):
        assert percentile(values, pct) == pytest.approx(cuts[pct - 1])


def record(index: int, sent: float, done: float, **kwargs: Any) -> RequestRecord:
    rec = RequestRecord(index, sent, prompt_tokens=10 * (index + 1), requested_output_tokens=4)
    rec.sent_at_s, rec.done_at_s, rec.e2e_s = sent, done, done - sent
    for key, value in kwargs.items():
        setattr(rec, key, value)
    return rec


def test_summarize_table_of_records() -> None:
    records = [
        record(0, 0.0, 2.0, ok=True, ttft_s=0.5, output_tokens=4, itl_s=[0.5, 0.5, 0.5]),
        record(1, 1.0, 3.0, ok=True, ttft_s=1.0, output_tokens=1),
        record(2, 1.5, 1.6, error="HTTP 400", error_detail="too long"),
        record(3, 1.5, 1.7, error="HTTP 400", error_detail="also too long"),
    ]
    summary = summarize(ReplayResult(records, wall_s=3.0, url="u", model="m"))

    assert (summary["launched"], summary["completed"], summary["failed"]) == (4, 2, 2)
    assert summary["failures"] == {"HTTP 400": 2}
    assert summary["failure_examples"] == {"HTTP 400": "too long"}
    assert summary["duration_s"] == 3.0  # first send 0.0 → last completion 3.0
    assert summary["request_throughput_rps"] == pytest.approx(2 / 3)
    assert summary["output_throughput_tok_s"] == pytest.approx(5 / 3)
    assert summary["input_throughput_tok_s"] == pytest.approx(30 / 3)
    assert summary["requested_output_tokens"] == 8
    assert summary["tpot_s"]["mean"] == pytest.approx(0.5)  # (2.0 - 0.5) / 3; record 1 has one token
    assert summary["ttft_s"]["p50"] == pytest.approx(0.75)
    assert summary["e2e_s"]["max"] == pytest.approx(2.0)
    assert summary["itl_s"]["mean"] == pytest.approx(0.5)
    json.dumps(summary)  # JSON-able


def test_summarize_empty_and_format_table() -> None:
    summary = summarize(ReplayResult([], wall_s=0.0))
    assert summary["completed"] == 0 and summary["request_throughput_rps"] is None
    assert summary["ttft_s"] == {"mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    table = format_table(summary)
    assert "TTFT" in table and "-" in table

    filled = summarize(ReplayResult([record(0, 0.0, 1.0, ok=True, ttft_s=0.25, output_tokens=2)], wall_s=1.0))
    lines = format_table(filled).splitlines()
    ttft = next(line for line in lines if line.startswith("TTFT"))
    assert ttft.split()[1:] == ["250.00"] * 5
    assert len({len(line) for line in lines if line.startswith(("TTFT", "TPOT", "ITL", "E2E"))}) == 1
