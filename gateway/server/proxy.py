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
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gateway.errors import (
    GatewayError,
    ModelNotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    UpstreamError,
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
        if isinstance(exc, OverloadedError):
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
        key = await _unless_disconnected(request, dispatcher.acquire(pending))
    except GatewayError as exc:
        return call.error(exc)
    except ClientDisconnected:
        return call.client_closed()
    request_log().placed(key.engine, key.rank, dispatcher.clock() - call.arrival)
    try:
        upstream = await _unless_disconnected(request, _send(state, key, route, parsed.body, call.request_id))
    except GatewayError as exc:
        dispatcher.finish(call.key)
        return call.error(exc)
    except ClientDisconnected:
        dispatcher.finish(call.key)
        return call.client_closed()
    except BaseException:
        dispatcher.finish(call.key)
        raise
    if upstream.status == 200 and parsed.stream and "text/event-stream" in upstream.content_type:
        return StreamingResponse(
            _relay(call, key, upstream),
            media_type="text/event-stream",
            headers={REQUEST_ID_HEADER: call.request_id, "Cache-Control": "no-cache"},
        )
    return await _whole(call, request, upstream)


async def _send(
    state: GatewayState, key: RankKey, route: Route, body: dict[str, object], request_id: str
) -> UpstreamResponse:
    engine, adapter = state.engines[key.engine]
    headers = upstream_request_headers(request_id)
    adapter.pin_rank(body, headers, key.rank)
    payload = json.dumps(body, ensure_ascii=False).encode()
    return await post_json(state.session, engine.url + ENGINE_PATHS[route], payload, headers)


async def _whole(call: _Call, request: Request, upstream: UpstreamResponse) -> Response:
    dispatcher = call.state.dispatcher
    try:
        raw = await _unless_disconnected(request, upstream.read())
    except GatewayError as exc:
        return call.error(exc)
    except ClientDisconnected:
        return call.client_closed()
    finally:
        upstream.close()
        dispatcher.finish(call.key)
    headers = {REQUEST_ID_HEADER: call.request_id}
    if upstream.status != 200:
        call.count(upstream.status)
        return JSONResponse(normalize_engine_error(upstream.status, raw), upstream.status, headers=headers)
    elapsed = dispatcher.clock() - call.arrival
    request_log().ttft_s = elapsed
    metrics = call.state.metrics
    metrics.ttft.labels(call.model_label).observe(elapsed)
    metrics.e2e.labels(call.model_label).observe(elapsed)
    call.count(200)
    return Response(raw, 200, media_type=upstream.content_type or "application/json", headers=headers)


async def _relay(call: _Call, key: RankKey, upstream: UpstreamResponse) -> AsyncIterator[bytes]:
    dispatcher = call.state.dispatcher
    metrics = call.state.metrics
    clock = dispatcher.clock
    started = False
    last = call.arrival
    status = "200"
    end = StreamEnd()
    try:
        async for chunk in upstream.chunks():
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
                        dispatcher.tokens(call.key, key.engine, events - 1, now - last)
                else:
                    dispatcher.tokens(call.key, key.engine, events, now - last)
                last = now
            yield chunk
        if not end.done:
            status = "stream_error"
            log.warning("stream %s from %s ended without [DONE]", call.request_id, key)
            yield end.error_events("the engine's stream ended before its end marker (data: [DONE])")
    except UpstreamError as exc:
        status = "stream_error"
        log.warning("stream %s from %s broke: %s", call.request_id, key, exc)
        yield end.error_events(exc.message, exc.type, exc.status)
    except (asyncio.CancelledError, GeneratorExit):
        status = "client_closed"
        raise
    finally:
        upstream.close()
        dispatcher.finish(call.key)
        metrics.e2e.labels(call.model_label).observe(clock() - call.arrival)
        call.count(status)
