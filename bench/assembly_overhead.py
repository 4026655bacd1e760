"""What assembling non-streamed answers from the engine's stream costs the gateway (``upstream.stream_nonstreamed``).

Two measurements:

1. In process, the data plane alone: the CPU to turn a recorded stream of a simulated engine (chat, ``tokens``
   output tokens, one SSE event a token) into the client's JSON answer (split the events, parse each, assemble,
   serialise), against what the gateway does with a non-streamed body when assembly is off (parse it for its
   ``usage``). Microseconds per answer, best of ``--repeat`` rounds.
2. Over HTTP: ``gateway serve`` (round robin) in front of one simulated vLLM (``gateway mock-engine``, 2 DP ranks,
   its clock ``--speed`` times real time), ``--requests`` non-streamed chat requests of exactly ``--tokens``
   output tokens at ``--concurrency``, with assembly on and then off: requests per second, and the gateway's and
   the engine's CPU time per request (user + system, from ``/proc/<pid>/stat``, so Linux only). The engine's own
   rate without the gateway, streamed and not, is measured too, and so is the gateway relaying client streams
   (the same reads and progress reports as assembly, without the assembling). Keep ``--speed`` so that an engine
   step lasts well over a millisecond of wall time: asyncio sleeps no shorter than the event loop's 1 ms timer
   resolution while the loop is idle, and a shorter step then runs faster for streams (whose writes keep waking
   the loop) than for non-streamed answers (at ``--speed 200`` the engine served 110 non-streamed and 300-420
   streamed requests per second), which would credit the gateway with the engine's artefact (CPython
   ``Lib/selectors.py``, ``EpollSelector.select`` rounds its timeout up to whole milliseconds).

    .venv/bin/python bench/assembly_overhead.py [--requests 600] [--concurrency 32] [--tokens 128]

prints the figures and writes ``bench/results/assembly_overhead.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from _harness import RESULTS, Processes, start_engines

from gateway.server.assemble import DONE, CompletionAssembler, SSEEvents, event_data
from gateway.sim.cluster import free_port
from gateway.sim.mock_engine.protocol import (
    GenerationRequest,
    completion_response,
    final_chunks,
    sse_event,
    token_chunks,
    usage_chunk,
)

MODEL = "deepseek-v3"


def recorded_stream(tokens: int) -> tuple[bytes, bytes]:
    """A simulated vLLM's stream (usage included) and its non-streamed body, for a chat answer of ``tokens``."""
    req = GenerationRequest(
        kind="chat",
        model=MODEL,
        prompt_tokens=200,
        max_tokens=tokens,
        output_tokens=tokens,
        finish_reason="length",
        stream=True,
        include_usage=True,
        rank=0,
    )
    rid, created = "chatcmpl-bench", 1700000000
    events = [sse_event(c) for i in range(tokens) for c in token_chunks(req, rid, created, i)]
    events += [sse_event(c) for c in final_chunks(req, rid, created)]
    events += [sse_event(usage_chunk(req, rid, created)), sse_event(DONE)]
    return b"".join(events), json.dumps(completion_response(req, rid, created)).encode()


def assemble_once(stream: bytes, chunk_bytes: int) -> bytes:
    """The gateway's work for one assembled answer, the stream arriving in ``chunk_bytes`` pieces."""
    events = SSEEvents()
    assembler = CompletionAssembler("chat")
    for start in range(0, len(stream), chunk_bytes):
        for raw in events.feed(stream[start : start + chunk_bytes]):
            data = event_data(raw)
            if data is not None and data != DONE:
                assembler.add(json.loads(data))
    return json.dumps(assembler.result()).encode()


def best_us(work: Any, repeat: int, per_round: int) -> float:
    """Best per-call microseconds of ``work()`` over ``repeat`` rounds of ``per_round`` calls."""
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        for _ in range(per_round):
            work()
        best = min(best, (time.process_time() - started) / per_round * 1e6)
    return best


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (``/proc/<pid>/stat`` fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(url: str, requests: int, concurrency: int, tokens: int, stream: bool = False) -> float:
    """Send ``requests`` chats (non-streamed unless ``stream``), ``concurrency`` at a time; return the wall
    seconds."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"request {i}: tell me about the sea"}],
                "max_tokens": tokens,
                "ignore_eos": True,
                "stream": stream,
            }
            async with session.post(url + "/v1/chat/completions", json=body) as r:
                if stream:
                    assert r.status == 200 and (await r.read()).endswith(b"data: [DONE]\n\n")
                    continue
                answer = await r.json()
                assert r.status == 200 and answer["usage"]["completion_tokens"] == tokens, answer

    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return time.perf_counter() - started


def http_run(
    engines: list[dict[str, Any]], engine_pid: int, assemble: bool, args: argparse.Namespace, stream: bool = False
) -> dict[str, float]:
    with Processes() as procs:
        port = free_port()
        config = {"policy": "round_robin", "engines": engines, "upstream": {"stream_nonstreamed": assemble}}
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(config, f)
        cmd = [sys.executable, "-m", "gateway", "serve", "--config", f.name, "--port", str(port)]
        url = procs.start([*cmd, "--log-level", "warning"], f"http://127.0.0.1:{port}", "/ready")
        pid = procs.procs[-1].pid
        asyncio.run(drive(url, min(50, args.requests), args.concurrency, args.tokens, stream))  # warm up
        before, engine_before = cpu_s(pid), cpu_s(engine_pid)
        wall = asyncio.run(drive(url, args.requests, args.concurrency, args.tokens, stream))
        used, engine_used = cpu_s(pid) - before, cpu_s(engine_pid) - engine_before
    return {
        "requests_per_s": args.requests / wall,
        "gateway_cpu_ms_per_request": used / args.requests * 1e3,
        "gateway_cpu_fraction": used / wall,
        "engine_cpu_ms_per_request": engine_used / args.requests * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128, help="output tokens of every answer")
    ap.add_argument("--speed", type=float, default=10.0, help="the simulated engine's clock speed")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--output", type=Path, default=RESULTS / "assembly_overhead.json")
    args = ap.parse_args()

    micro: dict[str, dict[str, float]] = {}
    for tokens in (16, args.tokens, 1024):
        recorded, body = recorded_stream(tokens)
        rounds = max(20, 20_000 // tokens)
        micro[str(tokens)] = {
            "assemble_us": best_us(lambda s=recorded: assemble_once(s, 4096), args.repeat, rounds),
            "parse_body_us": best_us(lambda b=body: json.loads(b), args.repeat, rounds),
            "stream_bytes": len(recorded),
        }
        m = micro[str(tokens)]
        print(
            f"{tokens:5d} tokens: assemble {m['assemble_us']:8.1f} us/answer "
            f"(non-streamed body parsed: {m['parse_body_us']:6.1f} us; stream {len(recorded)} bytes)"
        )

    http: dict[str, dict[str, float]] = {}
    with Processes() as procs:
        engines = start_engines(procs, ["vllm"], 2, args.speed, MODEL)
        engine_pid = procs.procs[0].pid
        for streamed in (True, False):
            name = "engine_direct_" + ("stream" if streamed else "nonstreamed")
            wall = asyncio.run(drive(engines[0]["url"], args.requests, args.concurrency, args.tokens, streamed))
            http[name] = {"requests_per_s": args.requests / wall}
            print(f"{name:27s}: {args.requests / wall:7.1f} requests/s (no gateway)")
        for name, assemble, stream in (
            ("assembly_on", True, False),
            ("assembly_off", False, False),
            ("client_stream", True, True),
        ):
            http[name] = http_run(engines, engine_pid, assemble, args, stream)
            h = http[name]
            print(
                f"{name:13s}: {h['requests_per_s']:7.1f} requests/s, gateway CPU "
                f"{h['gateway_cpu_ms_per_request']:6.2f} ms/request ({h['gateway_cpu_fraction']:.0%} of a core), "
                f"engine CPU {h['engine_cpu_ms_per_request']:6.2f} ms/request"
            )
    report = {
        "command": " ".join(["python", "bench/assembly_overhead.py", *sys.argv[1:]]),
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "micro_us_per_answer": micro,
        "http": http,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
