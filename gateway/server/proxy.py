"""Handling one completion request: validate, place on a DP rank, send to the engine, relay the answer.

Sending, with retries on other ranks, is :mod:`gateway.server.retry`; a client that goes away while the request
waits is noticed by :mod:`gateway.server.disconnect`.

Streams are relayed chunk by chunk as they arrive, bytes untouched; the relay only peeks at SSE ``data:``
events to report progress (first token, token count, inter-token gaps) to the dispatcher. When the client goes
away mid-stream, Starlette cancels the relay and the upstream connection is closed, so the engine aborts the
request and frees its KV cache.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gateway.errors import ClientDisconnected, GatewayError, ModelNotFoundError, PayloadTooLargeError, UpstreamError
from gateway.logs import REQUEST_ID_HEADER, request_log
from gateway.server.disconnect import unless_disconnected
from gateway.server.retry import StartedAnswer, record_failure, send_with_retries
from gateway.server.state import GatewayState
from gateway.server.stream_end import StreamEnd
from gateway.server.validation import Route, parse_request
from gateway.tokens import prompt_texts
from gateway.types import PendingRequest, prefix_block_hashes

log = logging.getLogger(__name__)

ENGINE_PATHS: dict[Route, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
CLIENT_CLOSED_STATUS = 499


@dataclass(slots=True)
class _RequestScope:
    """One completion request while it is handled: what its answer and its metrics need."""

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


async def handle_completion(state: GatewayState, request: Request, route: Route) -> Response:
    """Serve ``POST /v1/chat/completions`` or ``POST /v1/completions``."""
    dispatcher = state.dispatcher
    scope = _RequestScope(state, route, request_log().request_id, state.clock())
    try:
        raw = await _read_body(request, state.settings.max_body_bytes)
        parsed = parse_request(raw, route, max_tokens_limit=state.settings.max_tokens_limit)
        if parsed.model not in state.models:
            raise ModelNotFoundError(f"The model `{parsed.model}` does not exist.", param="model")
        scope.model_label = parsed.model
        pending = PendingRequest(
            request_id=scope.key,
            model=parsed.model,
            prompt_tokens=state.prompt_counter.count(parsed.model, parsed.body),
            max_output_tokens=parsed.max_tokens or state.settings.default_max_tokens,
            arrival_s=scope.arrival,
            stream=parsed.stream,
            prefix_blocks=prefix_block_hashes(prompt_texts(parsed.body)),
        )
        placement = await unless_disconnected(request, dispatcher.acquire(pending))
    except GatewayError as exc:
        return scope.error(exc)
    except ClientDisconnected:
        return scope.client_closed()
    key = placement.rank
    request_log().window_id = placement.window_id
    request_log().placed(key.engine, key.rank, state.clock() - scope.arrival)
    sending = send_with_retries(state, pending, key, ENGINE_PATHS[route], parsed.body, scope.request_id)
    try:
        answer = await unless_disconnected(request, sending)
    except GatewayError as exc:
        return scope.error(exc)
    except ClientDisconnected:
        return scope.client_closed()
    if answer.first_chunk is not None:
        return StreamingResponse(
            _relay(scope, answer),
            media_type="text/event-stream",
            headers={REQUEST_ID_HEADER: scope.request_id, "Cache-Control": "no-cache"},
        )
    return _buffered_response(scope, answer)


def _buffered_response(scope: _RequestScope, answer: StartedAnswer) -> Response:
    """The answer to a request whose engine answer was read whole (not a stream, or an engine error)."""
    dispatcher = scope.state.dispatcher
    dispatcher.finish(scope.key)
    upstream = answer.upstream
    headers = {REQUEST_ID_HEADER: scope.request_id}
    if upstream.status != 200:
        scope.count(upstream.status)
        body = scope.state.engines[answer.key.engine].adapter.normalize_error(upstream.status, answer.body)
        return JSONResponse(body, upstream.status, headers=headers)
    elapsed = scope.state.clock() - scope.arrival
    request_log().ttft_s = elapsed
    metrics = scope.state.metrics
    metrics.ttft.labels(scope.model_label).observe(elapsed)
    metrics.e2e.labels(scope.model_label).observe(elapsed)
    scope.count(200)
    return Response(answer.body, 200, media_type=upstream.content_type or "application/json", headers=headers)


async def _relay(scope: _RequestScope, answer: StartedAnswer) -> AsyncIterator[bytes]:
    """Relay a stream whose first chunk has arrived, chunk by chunk; end it with an SSE error event and
    ``[DONE]`` if the engine fails or stops before its own ``[DONE]`` (never a silent truncation)."""
    dispatcher = scope.state.dispatcher
    metrics = scope.state.metrics
    clock = scope.state.clock
    key, upstream = answer.key, answer.upstream
    idle_timeout = scope.state.settings.upstream.idle_timeout_s
    started = False
    status = "200"
    end = StreamEnd()
    chunk = answer.first_chunk or b""
    try:
        while chunk:
            end.feed(chunk)
            events = chunk.count(b"data:") - chunk.count(b"[DONE]")
            if events > 0:
                now = clock()
                if not started:
                    started = True
                    dispatcher.first_token(scope.key, key.engine)
                    metrics.ttft.labels(scope.model_label).observe(now - scope.arrival)
                    request_log().ttft_s = now - scope.arrival
                    if events > 1:
                        dispatcher.tokens(scope.key, key.engine, events - 1)
                else:
                    dispatcher.tokens(scope.key, key.engine, events)
            yield chunk
            chunk = await upstream.next_chunk(idle_timeout)
        if not end.done:
            raise UpstreamError("the engine's stream ended before its end marker (data: [DONE])")
    except UpstreamError as exc:
        status = "stream_error"
        record_failure(scope.state, key, exc)
        log.warning("stream %s from %s broke: %s", scope.request_id, key, exc.message)
        yield end.error_events(exc.message, exc.type, exc.status)
    except (asyncio.CancelledError, GeneratorExit):
        status = "client_closed"
        raise
    finally:
        upstream.close()
        dispatcher.finish(scope.key)
        metrics.e2e.labels(scope.model_label).observe(clock() - scope.arrival)
        scope.count(status)
