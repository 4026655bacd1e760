"""Handling one completion request: validate, place on a DP rank, send to the engine, relay the answer.

Sending, with retries on other ranks, is :mod:`gateway.server.retry`; a client that goes away while the request
waits is noticed by :mod:`gateway.server.disconnect`.

Streams are relayed chunk by chunk as they arrive, bytes untouched; the relay only peeks at SSE ``data:``
events to report progress (first token, token count, inter-token gaps) to the dispatcher. When the client goes
away mid-stream, Starlette cancels the relay and the upstream connection is closed, so the engine aborts the
request and frees its KV cache.

A request whose client asked for one JSON answer is sent to the engine as a stream all the same
(``upstream.stream_nonstreamed``): its progress is reported as a stream's, and the answer is assembled from the
stream (:mod:`gateway.server.assemble`) once it has ended with ``[DONE]``. A stream that breaks first is tried
again on another rank, like a non-streamed answer read whole (nothing reached the client yet), and the last
failure is answered with an error, never with half an answer. A client stream is sent with
``stream_options.include_usage`` even when the client did not ask for it (``upstream.stream_usage``), and the
usage is then dropped before it reaches the client. Every ``usage.prompt_tokens`` an engine reports goes to
:meth:`GatewayState.prompt_tokens_reported`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gateway.errors import (
    ClientDisconnected,
    GatewayError,
    ModelNotFoundError,
    PayloadTooLargeError,
    UpstreamError,
    UpstreamStatusError,
)
from gateway.logs import REQUEST_ID_HEADER, request_log
from gateway.server.assemble import (
    DONE,
    CompletionAssembler,
    SSEEvents,
    StreamUsage,
    error_event_status,
    event_data,
    reported_prompt_tokens,
)
from gateway.server.disconnect import unless_disconnected
from gateway.server.pd_relay import send_pd
from gateway.server.retry import StartedAnswer, record_failure, send_with_retries
from gateway.server.state import GatewayState
from gateway.server.stream_end import StreamEnd
from gateway.server.validation import ParsedRequest, Route, parse_request
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
    estimated_prompt_tokens: int = 0
    """The gateway's estimate of the prompt's tokens (what the engine's ``usage.prompt_tokens`` is compared with)."""
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    """The gateway's own id for the request in the window and the load view."""

    def usage_reported(self, prompt_tokens: int | None) -> None:
        """The engine reported ``prompt_tokens`` for this request (``None``: it reported none)."""
        if prompt_tokens is not None:
            self.state.prompt_tokens_reported(self.model_label, self.estimated_prompt_tokens, prompt_tokens)

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


@dataclass(frozen=True, slots=True)
class _Upstream:
    """How a request is sent to the engine.

    Attributes:
        body: the body sent (the client's, or a copy asking for a stream or for usage).
        assemble: the client asked for one JSON answer and the engine is asked for a stream.
        usage: with a client stream, what the relay does with usage: ``"watch"`` (the client asked for it),
            ``"strip"`` (the gateway asked for it), or ``None`` (nobody asked).
    """

    body: dict[str, Any]
    assemble: bool = False
    usage: Literal["watch", "strip"] | None = None


def _upstream(parsed: ParsedRequest, stream_nonstreamed: bool, stream_usage: bool) -> _Upstream:
    """What to send the engine for ``parsed`` (see the module docstring and :class:`~gateway.config.UpstreamConfig`)."""
    body = parsed.body
    options = body.get("stream_options")
    if not parsed.stream:
        as_sent = options is not None or body.get("best_of") is not None or body.get("use_beam_search") is True
        if not stream_nonstreamed or as_sent:
            return _Upstream(body)
        return _Upstream({**body, "stream": True, "stream_options": {"include_usage": True}}, assemble=True)
    if isinstance(options, dict) and options.get("include_usage") is True:
        return _Upstream(body, usage="watch")
    if not stream_usage or (options is not None and not isinstance(options, dict)):
        return _Upstream(body)
    if isinstance(options, dict) and options.get("continuous_usage_stats"):
        return _Upstream(body)
    return _Upstream({**body, "stream_options": {**(options or {}), "include_usage": True}}, usage="strip")


async def handle_completion(state: GatewayState, request: Request, route: Route) -> Response:
    """Serve ``POST /v1/chat/completions`` or ``POST /v1/completions``."""
    dispatcher = state.dispatcher
    scope = _RequestScope(state, route, request_log().request_id, state.clock())
    config = state.settings.upstream
    try:
        raw = await _read_body(request, state.settings.max_body_bytes)
        parsed = parse_request(raw, route, max_tokens_limit=state.settings.max_tokens_limit)
        if parsed.model not in state.models:
            raise ModelNotFoundError(f"The model `{parsed.model}` does not exist.", param="model")
        scope.model_label = parsed.model
        upstream = _upstream(parsed, config.stream_nonstreamed, config.stream_usage)
        pending = PendingRequest(
            request_id=scope.key,
            model=parsed.model,
            prompt_tokens=state.prompt_counter.count(parsed.model, parsed.body),
            max_output_tokens=parsed.max_tokens or state.settings.default_max_tokens,
            arrival_s=scope.arrival,
            stream=parsed.stream or upstream.assemble,
            prefix_blocks=prefix_block_hashes(prompt_texts(parsed.body)),
        )
        scope.estimated_prompt_tokens = pending.prompt_tokens
        placement = await unless_disconnected(request, dispatcher.acquire(pending))
    except GatewayError as exc:
        return scope.error(exc)
    except ClientDisconnected:
        return scope.client_closed()
    key = placement.rank
    request_log().window_id = placement.window_id
    request_log().placed(key.engine, key.rank, state.clock() - scope.arrival)
    assembly = _Assembly(scope) if upstream.assemble else None
    path = ENGINE_PATHS[route]
    if placement.decode_rank is not None:
        sending = send_pd(state, pending, placement, path, upstream.body, scope.request_id, consume=assembly)
    else:
        sending = send_with_retries(state, pending, key, path, upstream.body, scope.request_id, consume=assembly)
    try:
        answer = await unless_disconnected(request, sending)
    except GatewayError as exc:
        return scope.error(exc)
    except ClientDisconnected:
        return scope.client_closed()
    if answer.first_chunk is not None and assembly is not None:
        return assembly.response(answer)
    if answer.first_chunk is not None:
        watch = None if upstream.usage is None else StreamUsage(strip=upstream.usage == "strip")
        return StreamingResponse(
            _relay(scope, answer, watch),
            media_type="text/event-stream",
            headers={REQUEST_ID_HEADER: scope.request_id, "Cache-Control": "no-cache"},
        )
    return _buffered_response(scope, answer)


def _buffered_response(scope: _RequestScope, answer: StartedAnswer) -> Response:
    """The answer to a request whose engine answer was read whole (not a stream, or an engine error)."""
    answer.end_prefill_leg()
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
    if "json" in upstream.content_type:
        scope.usage_reported(_body_prompt_tokens(answer.body))
    return Response(answer.body, 200, media_type=upstream.content_type or "application/json", headers=headers)


def _body_prompt_tokens(body: bytes) -> int | None:
    """``usage.prompt_tokens`` of an engine's JSON answer, or ``None``."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return reported_prompt_tokens(parsed.get("usage")) if isinstance(parsed, dict) else None


@dataclass(slots=True)
class _Progress:
    """Reports a stream's progress to the dispatcher as its chunks arrive: the first token at the first
    ``data:`` event, then each chunk's events as tokens (``[DONE]`` not counted).

    Attributes:
        first_token_at: when the first event arrived (the state's clock), or ``None`` before.
    """

    scope: _RequestScope
    engine: str
    first_token_at: float | None = None

    def feed(self, chunk: bytes) -> bool:
        """Report ``chunk``; return whether it brought the stream's first event."""
        events = chunk.count(b"data:") - chunk.count(b"[DONE]")
        if events <= 0:
            return False
        dispatcher = self.scope.state.dispatcher
        if self.first_token_at is not None:
            dispatcher.tokens(self.scope.key, self.engine, events)
            return False
        self.first_token_at = self.scope.state.clock()
        dispatcher.first_token(self.scope.key, self.engine)
        if events > 1:
            dispatcher.tokens(self.scope.key, self.engine, events - 1)
        return True


class _Assembly:
    """The non-streamed answer of a request the engine streams: reads each try's stream whole (the ``consume``
    of :func:`~gateway.server.retry.send_with_retries`), reporting progress as :func:`_relay` does, then answers
    with the JSON the engine would have sent non-streamed."""

    def __init__(self, scope: _RequestScope) -> None:
        self.scope = scope
        self.assembler = CompletionAssembler(scope.route)
        self.progress: _Progress | None = None

    async def __call__(self, answer: StartedAnswer) -> None:
        """Read the stream of one try to its end.

        Raises:
            UpstreamStatusError: the stream carried the engine's error event with a 5xx code (or none: 502).
            UpstreamError: the stream broke, went silent for ``upstream.idle_timeout_s`` (504), ended before
                ``[DONE]``, or carried an event that is not JSON.
        """
        flavor = self.scope.state.engines[answer.key.engine].config.flavor
        self.assembler = assembler = CompletionAssembler(self.scope.route, tool_call_index=flavor == "sglang")
        self.progress = progress = _Progress(self.scope, answer.key.engine)
        idle_timeout = self.scope.state.settings.upstream.idle_timeout_s
        events = SSEEvents()
        done = False
        chunk = answer.first_chunk or b""
        while chunk:
            progress.feed(chunk)
            for raw in events.feed(chunk):
                data = event_data(raw)
                if data is None or done:
                    continue
                if data.strip() == DONE:
                    done = True
                    continue
                try:
                    assembler.add(json.loads(data))
                except ValueError as exc:
                    raise UpstreamError(f"the engine's stream carried an event that is not JSON: {exc}") from exc
            chunk = await answer.upstream.next_chunk(idle_timeout)
        if assembler.error is not None:
            status = error_event_status(assembler.error)
            if status >= 500:  # as the engine's 5xx to a non-streamed request: tried again elsewhere
                adapter = self.scope.state.engines[answer.key.engine].adapter
                raise UpstreamStatusError(status, adapter.normalize_error(status, json.dumps(assembler.error).encode()))
        elif not done:
            raise UpstreamError("the engine's stream ended before its end marker (data: [DONE])")

    def response(self, answer: StartedAnswer) -> Response:
        """The client's answer once the stream of ``answer``'s try was read whole."""
        answer.end_prefill_leg()
        scope, state = self.scope, self.scope.state
        state.dispatcher.finish(scope.key)
        now = state.clock()
        metrics = state.metrics
        first_token_at = self.progress.first_token_at if self.progress is not None else None
        if first_token_at is not None:
            metrics.ttft.labels(scope.model_label).observe(first_token_at - scope.arrival)
            request_log().ttft_s = first_token_at - scope.arrival
        metrics.e2e.labels(scope.model_label).observe(now - scope.arrival)
        headers = {REQUEST_ID_HEADER: scope.request_id}
        error = self.assembler.error
        if error is not None:
            status = error_event_status(error)
            scope.count(status)
            body = state.engines[answer.key.engine].adapter.normalize_error(status, json.dumps(error).encode())
            return JSONResponse(body, status, headers=headers)
        result = self.assembler.result()
        scope.usage_reported(reported_prompt_tokens(result.get("usage")))
        scope.count(200)
        return JSONResponse(result, 200, headers=headers)


async def _relay(scope: _RequestScope, answer: StartedAnswer, usage: StreamUsage | None = None) -> AsyncIterator[bytes]:
    """Relay a stream whose first chunk has arrived, chunk by chunk; end it with an SSE error event and
    ``[DONE]`` if the engine fails or stops before its own ``[DONE]`` (never a silent truncation). With
    ``usage``, the engine's usage is read (and, if the gateway asked for it, dropped) on the way."""
    dispatcher = scope.state.dispatcher
    metrics = scope.state.metrics
    clock = scope.state.clock
    key, upstream = answer.key, answer.upstream
    idle_timeout = scope.state.settings.upstream.idle_timeout_s
    progress = _Progress(scope, key.engine)
    status = "200"
    end = StreamEnd()
    chunk = answer.first_chunk or b""
    try:
        while chunk:
            if progress.feed(chunk):
                ttft = progress.first_token_at - scope.arrival if progress.first_token_at is not None else 0.0
                metrics.ttft.labels(scope.model_label).observe(ttft)
                request_log().ttft_s = ttft
            relayed = chunk if usage is None else usage.feed(chunk)
            if relayed:
                end.feed(relayed)
                yield relayed
            chunk = await upstream.next_chunk(idle_timeout)
        if usage is not None and (rest := usage.rest()):
            end.feed(rest)
            yield rest
        if not end.done:
            raise UpstreamError("the engine's stream ended before its end marker (data: [DONE])")
    except UpstreamError as exc:
        status = "stream_error"
        record_failure(scope.state, key, exc)
        if scope.state.engines[key.engine].config.role == "decode":  # a P/D decode leg broke after its first byte
            metrics.pd_leg_failures.labels(key.engine, "decode", exc.failure_kind).inc()
        log.warning("stream %s from %s broke: %s", scope.request_id, key, exc.message)
        yield end.error_events(exc.message, exc.type, exc.status)
    except (asyncio.CancelledError, GeneratorExit):
        status = "client_closed"
        raise
    finally:
        upstream.close()
        answer.end_prefill_leg()
        dispatcher.finish(scope.key)
        metrics.e2e.labels(scope.model_label).observe(clock() - scope.arrival)
        scope.count(status)
        if usage is not None and status == "200":
            scope.usage_reported(usage.prompt_tokens)
