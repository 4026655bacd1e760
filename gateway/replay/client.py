"""Trace-replay benchmark client (``gateway bench``): send a trace's requests at their arrival times.

Each trace request becomes one streaming OpenAI request (``/v1/chat/completions`` or ``/v1/completions``)
whose prompt is synthesised to the trace's prompt length and whose output is pinned to the trace's output
length (``max_tokens`` plus the vLLM/SGLang extensions ``ignore_eos`` and ``min_tokens``). Requests are
launched open loop at absolute offsets from one monotonic start, so a slow server does not slow the arrival
process; the actual send lag is recorded.

HTTP goes through aiohttp with an unbounded connection pool: plain httpx falls far behind at 50 concurrent
streams (``bench/results/decisions.md#engine-http-client``).

A trace with block ids (Mooncake's ``hash_ids``, one per 512-token block, equal ids for equal prefixes) gets
prompts that share text exactly where the ids are shared: each block id maps to a fixed text of 512 tokens (as
``prompts`` counts them), and a prompt is its blocks' texts in order, so a real or simulated engine's prefix cache
sees the reuse the trace records. Azure traces have no block ids: there every prompt starts with a short
request-unique tag (the request's index); without it every prompt would share one long prefix and an engine's
prefix cache would skip nearly all prefill work. What fills the prompts depends on ``prompts``:

- ``"estimate"`` (the default): :func:`~gateway.tokens.synthesize_prompt` filler, so the gateway's token
  estimate is exactly the trace's count (which flatters the gateway: it knows the engine's count);
- ``"tokenizer"``: English prose (:mod:`gateway.replay.prompts`) whose count under DeepSeek-V3's tokenizer, chat
  template included, is exactly the trace's count, so the gateway estimates it as it would real traffic.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
from tqdm import tqdm

from gateway.replay.sse import SSEDecoder
from gateway.tokens import CHARS_PER_TOKEN, synthesize_prompt
from gateway.types import PREFIX_BLOCK_TOKENS
from gateway.workload.stats import ReplayResult, RequestRecord, format_table, summarize
from gateway.workload.traces import TraceRequest, load_trace, rescale, resolve_trace, window

Endpoint = Literal["chat", "completions"]
PromptCount = Literal["estimate", "tokenizer"]
"""Whose count of a synthesised prompt is the trace's: the gateway's estimate, or DeepSeek-V3's tokenizer."""

_PATHS: dict[str, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
_DETAIL_CHARS = 200
KEEPALIVE_S = 2.0
"""Idle pooled connections to the server replayed against are closed after this long: below uvicorn's default
``timeout_keep_alive`` of 5 s, which ``gateway serve`` and the vLLM and SGLang servers run with, so the pool
rarely reuses a connection the server already closed."""


class ReplayError(RuntimeError):
    """The replay cannot start: the server's model list could not be fetched (no model was given)."""


def request_prompt(index: int, prompt_tokens: int) -> str:
    """The prompt of request ``index``: a unique 2-token tag then filler, ``prompt_tokens`` tokens in all by
    the gateway's :class:`~gateway.tokens.CharTokenizer` estimate (plain filler below 3 tokens)."""
    if prompt_tokens < 3:
        return synthesize_prompt(prompt_tokens)
    tag = f"{index % 16**7:07x} "  # 8 characters = 2 estimated tokens, unique for 268M requests
    assert len(tag) == 2 * CHARS_PER_TOKEN
    return tag + synthesize_prompt(prompt_tokens - 2)


def block_prompt(index: int, block_ids: Sequence[int], prompt_tokens: int) -> str:
    """The prompt of request ``index`` made of its blocks, ``prompt_tokens`` tokens by the gateway's estimate: each
    block ``b`` is the 8-character tag ``b`` (2 estimated tokens) then filler, 512 tokens (the last blocks
    shortened to fit); tokens past the last block get the request's own tag."""
    parts, left = [], prompt_tokens
    for block_id in block_ids:
        if left == 0:
            break
        take = min(PREFIX_BLOCK_TOKENS, left)
        parts.append(request_prompt(block_id, take))
        left -= take
    if left:
        parts.append(request_prompt(index, left))
    return "".join(parts)


def request_body(
    endpoint: Endpoint,
    model: str,
    index: int,
    prompt_tokens: int,
    output_tokens: int,
    prompts: PromptCount = "estimate",
    block_ids: Sequence[int] = (),
) -> dict[str, Any]:
    """The streaming request body asking for exactly ``output_tokens`` tokens after a synthesised prompt of
    ``prompt_tokens`` tokens as ``prompts`` counts them, made of ``block_ids``' texts when given (see the module's
    docstring)."""
    body: dict[str, Any] = {"model": model}
    if prompts == "tokenizer":
        from gateway.replay.prompts import tokenizer_prompts

        synth = tokenizer_prompts()
        if endpoint == "chat":
            content = (
                synth.chat_content_blocks(index, block_ids, prompt_tokens)
                if block_ids
                else synth.chat_content(index, prompt_tokens)
            )
            body["messages"] = [{"role": "user", "content": content}]
        else:
            body["prompt"] = (
                synth.blocks_text(index, block_ids, prompt_tokens) if block_ids else synth.text(index, prompt_tokens)
            )
    else:
        text = block_prompt(index, block_ids, prompt_tokens) if block_ids else request_prompt(index, prompt_tokens)
        if endpoint == "chat":
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
    body.update(
        max_tokens=output_tokens,
        ignore_eos=True,
        min_tokens=output_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    return body


@dataclass
class _StreamState:
    start: float
    last_text_at: float | None = None
    text_chunks: int = 0
    usage_tokens: int | None = None


def _error_message(payload: Any) -> str:
    """The human message of an OpenAI/vLLM/SGLang error body (dict or text), truncated."""
    if isinstance(payload, str):
        text = payload
        try:
            payload = json.loads(text)
        except ValueError:
            return text.strip()[:_DETAIL_CHARS]
    if isinstance(payload, dict):
        inner = payload.get("error", payload)
        if isinstance(inner, dict):
            inner = inner.get("message", inner.get("detail", inner))
        return str(inner)[:_DETAIL_CHARS]
    return str(payload)[:_DETAIL_CHARS]


def _chunk_text(chunk: dict[str, Any]) -> bool:
    """Whether a stream chunk carries generated text (content or reasoning) in any choice."""
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        parts = [choice.get("text")]
        if isinstance(delta, dict):
            parts += [delta.get("content"), delta.get("reasoning_content"), delta.get("reasoning")]
        if any(isinstance(p, str) and p for p in parts):
            return True
    return False


def _apply_event(record: RequestRecord, state: _StreamState, data: str, now: float) -> bool:
    """Update ``record`` with one SSE event; return True when the stream is over (``[DONE]`` or error)."""
    if data.strip() == "[DONE]":
        record.ok = True
        return True
    try:
        chunk = json.loads(data)
    except ValueError:
        record.error, record.error_detail = "invalid stream JSON", data[:_DETAIL_CHARS]
        return True
    if not isinstance(chunk, dict):
        record.error, record.error_detail = "invalid stream JSON", data[:_DETAIL_CHARS]
        return True
    if "error" in chunk or chunk.get("object") == "error":
        record.error, record.error_detail = "stream error", _error_message(chunk)
        return True
    usage = chunk.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        state.usage_tokens = usage["completion_tokens"]
    if _chunk_text(chunk):
        if state.last_text_at is None:
            record.ttft_s = now - state.start
        else:
            record.itl_s.append(now - state.last_text_at)
        state.last_text_at = now
        state.text_chunks += 1
    return False


async def _read_stream(resp: aiohttp.ClientResponse, record: RequestRecord, state: _StreamState) -> None:
    decoder = SSEDecoder()
    finished = False
    async for chunk in resp.content.iter_any():
        now = time.perf_counter()
        for data in decoder.feed(chunk):
            if _apply_event(record, state, data, now):
                finished = True
                break
        if finished:
            break
    if not finished:
        now = time.perf_counter()
        finished = any(_apply_event(record, state, data, now) for data in decoder.close())
    if not finished:
        record.error, record.error_detail = "incomplete stream", "stream ended without [DONE]"
    if record.ok:
        record.output_tokens = state.usage_tokens if state.usage_tokens is not None else state.text_chunks


async def _send(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    record: RequestRecord,
    t0: float,
) -> None:
    """Send one request and fill ``record``; never raises for server or network failures."""
    state = _StreamState(start=time.perf_counter())
    record.sent_at_s = state.start - t0
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                record.error = f"HTTP {resp.status}"
                record.error_detail = _error_message(await resp.text(errors="replace"))
            else:
                await _read_stream(resp, record, state)
    except TimeoutError as exc:  # aiohttp's ServerTimeoutError is one too
        record.error, record.error_detail = "timeout", str(exc)[:_DETAIL_CHARS] or type(exc).__name__
    except aiohttp.ClientError as exc:
        record.error, record.error_detail = type(exc).__name__, str(exc)[:_DETAIL_CHARS]
    end = time.perf_counter()
    record.ok = record.ok and record.error is None
    record.done_at_s = end - t0
    record.e2e_s = end - state.start


async def fetch_model(session: aiohttp.ClientSession, base_url: str, headers: dict[str, str]) -> str:
    """The first model id of ``GET {base_url}/v1/models``.

    Raises:
        ReplayError: the request fails, is not 200, or lists no model.
    """
    try:
        async with session.get(f"{base_url}/v1/models", headers=headers) as resp:
            text = await resp.text(errors="replace")
            if resp.status != 200:
                raise ReplayError(f"GET {base_url}/v1/models: HTTP {resp.status}: {_error_message(text)}")
            models: Any = json.loads(text).get("data") or []
            return str(models[0]["id"])
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ReplayError(f"GET {base_url}/v1/models failed: {type(exc).__name__}: {exc}") from exc
    except (ValueError, AttributeError, LookupError, TypeError) as exc:
        raise ReplayError(f"GET {base_url}/v1/models: no model id in the response") from exc


async def _arrivals(
    schedule: Sequence[TraceRequest], t0: float, duration_s: float | None
) -> AsyncIterator[tuple[int, TraceRequest]]:
    """Yield ``(index, request)`` at each arrival, sleeping to absolute times ``t0 + arrival_s`` (no drift);
    stop at the first arrival at or past ``duration_s``, or once ``duration_s`` wall seconds have passed."""
    for index, req in enumerate(schedule):
        if duration_s is not None and req.arrival_s >= duration_s:
            return
        delay = t0 + req.arrival_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if duration_s is not None and time.perf_counter() - t0 >= duration_s:
            return
        yield index, req


def _base_url(url: str) -> str:
    base = url.rstrip("/")
    return base.removesuffix("/v1")


async def replay(
    url: str,
    trace: Sequence[TraceRequest],
    *,
    model: str | None = None,
    duration_s: float | None = None,
    rate_scale: float = 1.0,
    endpoint: Endpoint = "chat",
    api_key: str | None = None,
    progress: bool = True,
    timeout_s: float = 600,
    prompts: PromptCount = "estimate",
    headers: Mapping[str, str] | None = None,
) -> ReplayResult:
    """Replay ``trace`` against the OpenAI-compatible server at ``url`` and record every request.

    Args:
        url: server base URL, e.g. ``http://127.0.0.1:8000`` (a trailing ``/v1`` is accepted).
        trace: requests to send; arrival ``a`` is sent at ``a / rate_scale`` seconds after the start.
        model: model name; the first id of ``GET /v1/models`` when None.
        duration_s: stop launching requests once this many wall seconds have passed (or the next arrival
            is later), then wait for those in flight; the whole trace when None.
        rate_scale: arrival-time divisor, > 0 (2.0 = twice the trace's request rate).
        endpoint: ``"chat"`` (``/v1/chat/completions``) or ``"completions"`` (``/v1/completions``).
        api_key: sent as ``Authorization: Bearer``.
        progress: show a tqdm bar of completed requests on stderr.
        timeout_s: per-request limit on the whole exchange, seconds; exceeding it is a ``"timeout"`` failure.
        prompts: whose count of each prompt is the trace's (``"estimate"``: the gateway's; ``"tokenizer"``:
            DeepSeek-V3's, chat template included).
        headers: further headers sent with every request (e.g. a priority class).

    Returns:
        A :class:`~gateway.workload.stats.ReplayResult`; failed requests are records, not exceptions.

    Raises:
        ValueError: bad ``duration_s``, ``timeout_s``, ``endpoint`` or ``rate_scale``.
        ReplayError: ``model`` is None and ``GET /v1/models`` failed or listed no model.
    """
    if duration_s is not None and not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if endpoint not in _PATHS:
        raise ValueError(f"endpoint must be 'chat' or 'completions', got {endpoint!r}")
    if prompts not in ("estimate", "tokenizer"):
        raise ValueError(f"prompts must be 'estimate' or 'tokenizer', got {prompts!r}")
    schedule = sorted(rescale(trace, rate_scale), key=lambda r: r.arrival_s)
    base = _base_url(url)
    headers = {**(headers or {}), **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    expected = sum(1 for r in schedule if duration_s is None or r.arrival_s < duration_s)
    records: list[RequestRecord] = []
    # idle pooled connections are dropped before uvicorn's 5 s keep-alive closes them on the server side:
    # otherwise a request sent on a connection the server is closing fails with "connection reset"
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        model = model or await fetch_model(session, base, headers)
        with tqdm(total=expected, disable=not progress, file=sys.stderr, unit="req", desc="replay") as bar:
            failed = 0

            async def run_one(body: dict[str, Any], record: RequestRecord) -> None:
                nonlocal failed
                await _send(session, base + _PATHS[endpoint], body, headers, record, t0)
                failed += not record.ok
                bar.update(1)
                if failed:
                    bar.set_postfix_str(f"failed={failed}", refresh=False)

            t0 = time.perf_counter()
            async with asyncio.TaskGroup() as tasks:
                async for index, req in _arrivals(schedule, t0, duration_s):
                    record = RequestRecord(index, req.arrival_s, req.prompt_tokens, req.output_tokens)
                    records.append(record)
                    body = request_body(
                        endpoint, model, index, req.prompt_tokens, req.output_tokens, prompts, req.hash_ids
                    )
                    tasks.create_task(run_one(body, record))
            wall_s = time.perf_counter() - t0
    return ReplayResult(
        records=records,
        wall_s=wall_s,
        url=base,
        model=model,
        endpoint=endpoint,
        rate_scale=rate_scale,
        duration_limit_s=duration_s,
        trace_requests=len(schedule),
    )


def run_bench(
    url: str,
    trace_name_or_path: str | Path,
    *,
    duration_s: float | None = None,
    rate_scale: float = 1.0,
    output: str | Path | None = None,
    model: str | None = None,
    endpoint: Endpoint = "chat",
    start_s: float = 0.0,
    max_requests: int | None = None,
    progress: bool = True,
    api_key: str | None = None,
    timeout_s: float = 600,
    prompts: PromptCount = "estimate",
) -> dict[str, Any]:
    """Load a trace, replay it (:func:`replay`), print the table to stdout, write the summary JSON.

    The trace is cut on its own clock before rescaling: requests from ``start_s`` trace seconds on (re-based
    to 0), then the first ``max_requests``. ``duration_s`` is the wall-time launch limit of :func:`replay`.

    Returns:
        The :func:`~gateway.workload.stats.summarize` dict, ``config`` extended with ``trace``, ``trace_file``,
        ``start_s`` and ``max_requests``; also written as JSON to ``output`` (parent folders created).

    Raises:
        FileNotFoundError: unknown trace name or missing file.
        ValueError: malformed trace, or a bad argument (``start_s < 0``, ``max_requests < 1``, see
            :func:`replay`).
        ReplayError: see :func:`replay`.
    """
    path = resolve_trace(trace_name_or_path)
    trace = load_trace(path)
    if start_s:
        trace = window(trace, start_s)
    if max_requests is not None:
        if max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {max_requests}")
        trace = trace[:max_requests]
    result = asyncio.run(
        replay(
            url,
            trace,
            model=model,
            duration_s=duration_s,
            rate_scale=rate_scale,
            endpoint=endpoint,
            api_key=api_key,
            progress=progress,
            timeout_s=timeout_s,
            prompts=prompts,
        )
    )
    summary = summarize(result)
    summary["config"].update(
        trace=str(trace_name_or_path), trace_file=str(path), start_s=start_s, max_requests=max_requests, prompts=prompts
    )
    print(format_table(summary), flush=True)
    if output is not None:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
