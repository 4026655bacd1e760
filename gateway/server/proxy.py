"""Forwarding one completion request: validate, place on a DP rank, send to the engine, relay the answer.

Streams are relayed chunk by chunk as they arrive, bytes untouched; the relay only peeks at SSE ``data:``
events to report progress (first token, token count, inter-token gaps) to the dispatcher. When the client goes
away mid-stream, Starlette cancels the relay and the upstream connection is closed, so the engine aborts the
request and frees its KV cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gateway.errors import (
    GatewayError,
    ModelNotFoundError,
    PayloadTooLargeError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    normalize_engine_error,
)
from gateway.logs import REQUEST_ID_HEADER, request_log
from gateway.scheduling.tokens import count_prompt_tokens
from gateway.scheduling.types import PendingRequest, RankKey
from gateway.server.headers import upstream_request_headers
from gateway.server.state import GatewayState
from gateway.server.stream_end import StreamEnd
from gateway.server.upstream import UpstreamResponse, post_json
from gateway.server.validation import Route, parse_request

log = logging.getLogger(__name__)

ENGINE_PATHS: dict[Route, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
CLIENT_CLOSED_STATUS = 499
T = TypeVar("T")


@dataclass(slots=True)
class _Call:
    state: GatewayState
    route: Route
    request_id: str
    """The client's valid ``X-Request-Id`` (or a generated one, see :mod:`gateway.logs`): logged and sent
    upstream, never trusted as a key."""
    arrival: float
    model_label: str = "unknown"
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    """The gateway's own id for the request in the window and the load view."""

    def count(self, status: int | str) -> None:
        self.state.metrics.requests.labels(self.route, self.model_label, str(status)).inc()

    def client_closed(self) -> Response:
        """The client went away: nothing is sent (499 is nginx's "client closed request" status)."""
        self.count("client_closed")
        return Response(status_code=CLIENT_CLOSED_STATUS)

    def error(self, exc: GatewayError) -> JSONResponse:
        self.count(exc.status)
        headers = {REQUEST_ID_HEADER: self.request_id}
        if exc.retry_after_s is not None:
            headers["Retry-After"] = str(exc.retry_after_s)
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it is known to exceed ``limit`` bytes (declared or received).

    Raises:
        PayloadTooLargeError: the body is larger than ``limit``.
    """
    too_large = PayloadTooLargeError(f"the request body exceeds the gateway's limit of {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


class ClientDisconnected(Exception):
    """The client closed its connection before the answer was ready."""


async def _wait_for_disconnect(request: Request) -> None:
    # the body has been read: the next ASGI message can only be the disconnect
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable``; if the client disconnects first, cancel it and raise :class:`ClientDisconnected`.

    Cancelling an upstream call closes its connection, which makes the engine abort the request and free its KV
    cache; cancelling a wait in the window takes the request out of it.
    """
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientDisconnected


async def handle_completion(state: GatewayState, request: Request, route: Route) -> Response:
    """Serve ``POST /v1/chat/completions`` or ``POST /v1/completions``."""
    dispatcher = state.dispatcher
    call = _Call(state, route, request_log().request_id, dispatcher.clock())
    try:
        raw = await _read_body(request, state.settings.max_body_bytes)
        parsed = parse_request(raw, route, max_tokens_limit=state.settings.max_tokens_limit)
        if parsed.model not in state.models:
            raise ModelNotFoundError(f"The model `{parsed.model}` does not exist.", param="model")
        call.model_label = parsed.model
        pending = PendingRequest(
            request_id=call.key,
            model=parsed.model,
            prompt_tokens=count_prompt_tokens(parsed.body, state.tokenizer),
            max_output_tokens=parsed.max_tokens or state.settings.default_max_tokens,
            arrival_s=call.arrival,
            stream=parsed.stream,
        )
        placement = await _unless_disconnected(request, dispatcher.acquire(pending))
    except GatewayError as exc:
        return call.error(exc)
    except ClientDisconnected:
        return call.client_closed()
    key = placement.rank
    request_log().window_id = placement.window_id
    request_log().placed(key.engine, key.rank, dispatcher.clock() - call.arrival)
    try:
        attempt = await _unless_disconnected(request, _attempts(call, pending, key, parsed.body))
    except GatewayError as exc:
        return call.error(exc)
    except ClientDisconnected:
        return call.client_closed()
    if attempt.first_chunk is not None:
        return StreamingResponse(
            _relay(call, attempt),
            media_type="text/event-stream",
            headers={REQUEST_ID_HEADER: call.request_id, "Cache-Control": "no-cache"},
        )
    return _whole(call, attempt)


@dataclass(slots=True)
class _Attempt:
    """A request whose answer has begun at an engine: the rank, the response, and either (streams) its first
    chunk or (anything else) its whole body."""

    key: RankKey
    upstream: UpstreamResponse
    first_chunk: bytes | None = None
    body: bytes = b""


class _RetryableStatus(UpstreamError):
    """The engine answered HTTP 5xx: nothing reached the client, so the request may go elsewhere."""

    def __init__(self, status: int, raw: bytes) -> None:
        super().__init__(f"the engine answered HTTP {status}", status=status)
        self.raw = raw


async def _attempts(call: _Call, pending: PendingRequest, key: RankKey, body: dict[str, object]) -> _Attempt:
    """Send the request to ``key`` and, while it fails before any byte reached the client, to other ranks.

    A streamed answer counts as begun at its first event; any other answer is read whole here, so an answer
    that breaks off before its end is tried again too.

    At most ``upstream.max_attempts`` tries, with exponential backoff and full jitter between them, and none
    while retry throttling is engaged (:class:`~gateway.load.health.RetryThrottle`). Every
    failure feeds the circuit breakers; the request is released from the load view after each failed try and
    after the last one (the caller releases it once the answer is over). A 5xx on the last try is passed on as
    the engine's own error body; any other status is returned as it is.

    Raises:
        GatewayError: the last try failed (its error), or no other rank is usable for a retry (the previous
            try's error).
    """
    state = call.state
    config = state.settings.upstream
    failed: set[RankKey] = set()
    tries = 1
    while True:
        try:
            return await _try(call, key, pending.stream, body)
        except UpstreamError as exc:
            state.dispatcher.finish(call.key)
            _record_failure(state, key, exc)
            # nothing reached the client yet, so any failure may be retried; but a non-streamed request that
            # timed out has used its whole total_timeout_s
            total_spent = isinstance(exc, UpstreamTimeoutError) and not pending.stream
            final = tries >= config.max_attempts or total_spent
            if not final and not state.retry_throttle.allows_retry():
                state.metrics.retries_throttled.inc()
                final = True
            if not final:
                failed.add(key)
                backoff_s = min(config.retry_backoff_max_s, config.retry_backoff_s * 2**tries)
                await asyncio.sleep(random.uniform(0, backoff_s))
                try:
                    next_key = state.dispatcher.place_retry(pending, failed)
                except GatewayError:
                    final = True
            if final:
                if isinstance(exc, _RetryableStatus):
                    raise _EngineAnswer(exc.status, exc.raw) from None
                raise
            log.info("request %s: retrying on %s after %s failed: %s", call.request_id, next_key, key, exc.message)
            state.metrics.upstream_retries.labels(key.engine).inc()
            key = next_key
            log_entry = request_log()
            log_entry.engine, log_entry.rank = key.engine, key.rank
            tries += 1
        except BaseException:
            state.dispatcher.finish(call.key)
            raise


class _EngineAnswer(GatewayError):
    """The engine's own error answer (status and body), passed on to the client in OpenAI shape."""

    def __init__(self, status: int, raw: bytes) -> None:
        super().__init__(f"engine answered HTTP {status}", status=status)
        self.raw = raw

    def body(self) -> dict[str, Any]:
        return normalize_engine_error(self.status, self.raw)


def _record_failure(state: GatewayState, key: RankKey, exc: UpstreamError) -> None:
    """Feed a failed try to the circuit breakers and ``gateway_upstream_failures_total``."""
    if isinstance(exc, UpstreamUnavailableError):
        kind, scope = "unavailable", "engine"
    elif isinstance(exc, UpstreamTimeoutError):
        kind, scope = "timeout", "rank"
    elif isinstance(exc, _RetryableStatus):
        kind, scope = "http_5xx", "rank"
    else:
        kind, scope = "stream_broken", "rank"
    state.metrics.upstream_failures.labels(key.engine, kind).inc()
    state.retry_throttle.on_failure()
    state.health.record_failure(key, scope, state.dispatcher.clock())
    state.prober.publish()


async def _try(call: _Call, key: RankKey, stream: bool, body: dict[str, object]) -> _Attempt:
    """One try on ``key``: send, wait for the headers and, for a 200 stream, for its first chunk; read any other
    answer whole.

    Raises:
        _RetryableStatus: the engine answered HTTP 5xx (the body is read, the response closed).
        UpstreamError: the engine could not be reached, timed out, or the stream broke before its first chunk.
    """
    state = call.state
    config = state.settings.upstream
    engine, adapter = state.engines[key.engine]
    headers = upstream_request_headers(call.request_id)
    sent = dict(body)
    adapter.pin_rank(sent, headers, key.rank)
    payload = json.dumps(sent, ensure_ascii=False).encode()
    url = engine.url + ENGINE_PATHS[call.route]
    headers_timeout = config.first_byte_timeout_s if stream else config.total_timeout_s
    first_byte_by = asyncio.get_running_loop().time() + config.first_byte_timeout_s
    upstream = await post_json(
        state.session, url, payload, headers, headers_timeout_s=headers_timeout, total_timeout_s=config.total_timeout_s
    )
    try:
        if upstream.status >= 500:
            raw = await upstream.read()
            raise _RetryableStatus(upstream.status, raw)
        attempt = _Attempt(key, upstream)
        if upstream.status == 200 and stream and "text/event-stream" in upstream.content_type:
            first = await upstream.next_chunk(max(0.0, first_byte_by - asyncio.get_running_loop().time()))
            if not first:
                raise UpstreamError("the engine closed the stream before its first event")
            attempt.first_chunk = first
        else:  # nothing is sent to the client before the whole answer is in, so a broken body is retried too
            attempt.body = await upstream.read()
            upstream.close()
    except BaseException:
        upstream.close()
        raise
    state.health.record_success(key, state.dispatcher.clock())
    state.retry_throttle.on_success()
    return attempt


def _whole(call: _Call, attempt: _Attempt) -> Response:
    """The answer to a request whose engine answer was read whole (not a stream, or an engine error)."""
    dispatcher = call.state.dispatcher
    dispatcher.finish(call.key)
    upstream = attempt.upstream
    headers = {REQUEST_ID_HEADER: call.request_id}
    if upstream.status != 200:
        call.count(upstream.status)
        body = normalize_engine_error(upstream.status, attempt.body)
        return JSONResponse(body, upstream.status, headers=headers)
    elapsed = dispatcher.clock() - call.arrival
    request_log().ttft_s = elapsed
    metrics = call.state.metrics
    metrics.ttft.labels(call.model_label).observe(elapsed)
    metrics.e2e.labels(call.model_label).observe(elapsed)
    call.count(200)
    return Response(attempt.body, 200, media_type=upstream.content_type or "application/json", headers=headers)


async def _relay(call: _Call, attempt: _Attempt) -> AsyncIterator[bytes]:
    """Relay a stream whose first chunk has arrived, chunk by chunk; end it with an SSE error event and
    ``[DONE]`` if the engine fails or stops before its own ``[DONE]`` (never a silent truncation)."""
    dispatcher = call.state.dispatcher
    metrics = call.state.metrics
    clock = dispatcher.clock
    key, upstream = attempt.key, attempt.upstream
    idle_timeout = call.state.settings.upstream.idle_timeout_s
    started = False
    status = "200"
    end = StreamEnd()
    chunk = attempt.first_chunk or b""
    try:
        while chunk:
            end.feed(chunk)
            events = chunk.count(b"data:") - chunk.count(b"[DONE]")
            if events > 0:
                now = clock()
                if not started:
                    started = True
                    dispatcher.first_token(call.key, key.engine)
                    metrics.ttft.labels(call.model_label).observe(now - call.arrival)
                    request_log().ttft_s = now - call.arrival
                    if events > 1:
                        dispatcher.tokens(call.key, key.engine, events - 1)
                else:
                    dispatcher.tokens(call.key, key.engine, events)
            yield chunk
            chunk = await upstream.next_chunk(idle_timeout)
        if not end.done:
            raise UpstreamError("the engine's stream ended before its end marker (data: [DONE])")
    except UpstreamError as exc:
        status = "stream_error"
        _record_failure(call.state, key, exc)
        log.warning("stream %s from %s broke: %s", call.request_id, key, exc.message)
        yield end.error_events(exc.message, exc.type, exc.status)
    except (asyncio.CancelledError, GeneratorExit):
        status = "client_closed"
        raise
    finally:
        upstream.close()
        dispatcher.finish(call.key)
        metrics.e2e.labels(call.model_label).observe(clock() - call.arrival)
        call.count(status)
