"""Handling one completion request: validate, place on a DP rank, send to the engine, relay the answer.

Plain ASGI (:func:`serve_completion`, reached before FastAPI's routing, :mod:`gateway.server.app`): a relay needs
no dependency injection, no response classes and no task per wait. Sending, with retries on other ranks, is
:mod:`gateway.server.retry`; a client that goes away while the request waits or streams is noticed by
:mod:`gateway.server.disconnect`, whose watcher cancels the request's task.

Streams are relayed chunk by chunk as they arrive, bytes untouched; the relay only counts SSE ``data:`` events
to report progress (first token, token count, inter-token gaps) to the dispatcher. When the client goes away
mid-stream, the relay is cancelled and the upstream connection is closed, so the engine aborts the request and
frees its KV cache.

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
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from starlette.types import Receive, Scope, Send

from gateway.errors import (
    ClientDisconnected,
    GatewayError,
    ModelNotFoundError,
    PayloadTooLargeError,
    UpstreamError,
    UpstreamStatusError,
)
from gateway.logs import request_log
from gateway.server import fastjson
from gateway.server.assemble import (
    CompletionAssembler,
    SSEEvents,
    StreamUsage,
    error_event_status,
    event_payload,
    parse_event,
    reported_prompt_tokens,
)
from gateway.server.disconnect import DisconnectWatch
from gateway.server.pd_relay import send_pd
from gateway.server.retry import StartedAnswer, record_failure, send_with_retries
from gateway.server.state import GatewayState
from gateway.server.stream_end import StreamEnd
from gateway.server.tenants import TENANT_SCOPE_KEY, TenantAccount, admit
from gateway.server.validation import ParsedRequest, Route, parse_request
from gateway.tokens import prompt_texts
from gateway.types import PendingRequest, prefix_block_hashes

log = logging.getLogger(__name__)

ENGINE_PATHS: dict[Route, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
CLIENT_CLOSED_STATUS = 499
_REQUEST_ID = b"x-request-id"
_JSON = b"application/json"
_STREAM_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
_keys = itertools.count()


def _content_type(media_type: str) -> bytes:
    """A ``Content-Type`` value as Starlette's ``Response`` writes it (a text type gains ``charset=utf-8``)."""
    if media_type.startswith("text/") and "charset=" not in media_type.lower():
        media_type += "; charset=utf-8"
    return media_type.encode("latin-1")


async def send_answer(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]], content_type: bytes = _JSON
) -> None:
    """Send a whole answer."""
    head = [(b"content-length", b"%d" % len(body)), (b"content-type", content_type), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


@dataclass(slots=True)
class AnswerScope:
    """What every request answered through the relay keeps while it is handled (a completion's
    :class:`_RequestScope`, a Response's call in :mod:`gateway.server.responses`): its ids, its metrics' labels, its
    tenant's account, and the error and client-closed answers. :meth:`count` is each kind's own."""

    state: GatewayState
    request_id: str
    """The client's valid ``X-Request-Id`` (or a generated one, see :mod:`gateway.logs`): logged and sent
    upstream, never trusted as a key."""
    arrival: float
    model_label: str = "unknown"
    estimated_prompt_tokens: int = 0
    """The gateway's estimate of the prompt's tokens (what the engine's ``usage.prompt_tokens`` is compared with)."""
    tenant: TenantAccount | None = None
    """The request's account with its tenant (tenants configured, once admitted), else ``None``."""
    output_events: int = 0
    """Streamed token events relayed or read (one a token, as the scheduler counts them)."""

    @property
    def id_header(self) -> list[tuple[bytes, bytes]]:
        return [(_REQUEST_ID, self.request_id.encode("latin-1"))]

    def class_ttft(self, ttft_s: float) -> None:
        """Observe the request's time to first token in its class (tenants configured)."""
        if self.tenant is not None:
            self.tenant.first_token(ttft_s)

    def count(self, status: int | str) -> None:
        """Count the answer in ``gateway_requests_total`` and settle the tenant's tokens."""
        raise NotImplementedError

    async def client_closed(self, send: Send) -> None:
        """The client went away: nothing reaches it (499 is nginx's "client closed request" status; the server
        drops the answer, the access log records it)."""
        self.count("client_closed")
        await send_answer(send, CLIENT_CLOSED_STATUS, b"", [])

    async def error(self, exc: GatewayError, send: Send) -> None:
        self.count(exc.status)
        headers = self.id_header
        if exc.retry_after_s is not None:
            headers.append((b"retry-after", str(exc.retry_after_s).encode()))
        await send_answer(send, exc.status, fastjson.dumps(exc.body()), headers)


@dataclass(slots=True)
class _RequestScope(AnswerScope):
    """One completion request while it is handled: what its answer and its metrics need."""

    route: Route = field(kw_only=True)
    key: str = field(default_factory=lambda: f"r{next(_keys)}")
    """The gateway's own id for the request in the window and the load view (unique within the process)."""
    reported_prompt_tokens: int | None = None

    def usage_reported(self, prompt_tokens: int | None) -> None:
        """The engine reported ``prompt_tokens`` for this request (``None``: it reported none)."""
        if prompt_tokens is not None:
            self.reported_prompt_tokens = prompt_tokens
            self.state.prompt_tokens_reported(self.model_label, self.estimated_prompt_tokens, prompt_tokens)

    def count(self, status: int | str) -> None:
        """Count the answer, and settle the tenant's tokens with what it used (:meth:`TenantAccount.settle`: the
        reported prompt tokens plus the streamed events)."""
        state = self.state
        state.metrics.count_request(self.route, self.model_label, str(status))
        if self.tenant is not None:
            prompt = self.reported_prompt_tokens
            self.tenant.settle(status, self.estimated_prompt_tokens, prompt, self.output_events, state.clock())


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"the request body exceeds the gateway's limit of {limit} bytes")


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request body, refused as soon as it is known to exceed ``limit`` bytes (declared or received).

    Raises:
        PayloadTooLargeError: the body is larger than ``limit``.
        ClientDisconnected: the client went away before sending all of it.
    """
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


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


async def serve_completion(state: GatewayState, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
    """Serve ``POST /v1/chat/completions`` (``route="chat"``) or ``POST /v1/completions`` as a plain ASGI app."""
    request = _RequestScope(state, request_log().request_id, state.clock(), route=route)
    config = state.settings.upstream
    try:
        raw = await read_body(scope, receive, state.settings.max_body_bytes)
        parsed = parse_request(raw, route, max_tokens_limit=state.settings.max_tokens_limit)
        if parsed.model not in state.models:
            raise ModelNotFoundError(f"The model `{parsed.model}` does not exist.", param="model")
        request.model_label = parsed.model
        upstream = _upstream(parsed, config.stream_nonstreamed, config.stream_usage)
        pending = PendingRequest(
            request_id=request.key,
            model=parsed.model,
            prompt_tokens=state.prompt_counter.count(parsed.model, parsed.body),
            max_output_tokens=parsed.max_tokens or state.settings.default_max_tokens,
            arrival_s=request.arrival,
            stream=parsed.stream or upstream.assemble,
            prefix_blocks=prefix_block_hashes(prompt_texts(parsed.body)),
        )
        request.estimated_prompt_tokens = pending.prompt_tokens
        tenant = scope.get(TENANT_SCOPE_KEY)
        if tenant is not None:
            request.tenant = admit(tenant, state.metrics, state.clock(), pending)
    except GatewayError as exc:
        await request.error(exc, send)
        return
    except ClientDisconnected:
        await request.client_closed(send)
        return
    watch = DisconnectWatch(receive)
    try:
        await _place_and_answer(request, pending, upstream, send, watch)
    finally:
        watch.close()


async def _place_and_answer(
    request: _RequestScope, pending: PendingRequest, upstream: _Upstream, send: Send, watch: DisconnectWatch
) -> None:
    """Wait for a rank, send the request there (retrying elsewhere while it fails before its answer began), and
    answer the client."""
    state = request.state
    assembly = _Assembly(request) if upstream.assemble else None
    try:
        placement = await state.dispatcher.acquire(pending)
        key = placement.rank
        entry = request_log()
        entry.window_id = placement.window_id
        entry.placed(key.engine, key.rank, state.clock() - request.arrival)
        path = ENGINE_PATHS[request.route]
        if placement.decode_rank is not None:
            sending = send_pd(state, pending, placement, path, upstream.body, request.request_id, consume=assembly)
        else:
            sending = send_with_retries(state, pending, key, path, upstream.body, request.request_id, consume=assembly)
        answer = await sending
    except GatewayError as exc:
        watch.close()
        await request.error(exc, send)
        return
    except asyncio.CancelledError:
        if not watch.absorb():
            raise
        await request.client_closed(send)
        return
    if answer.first_chunk is not None and assembly is not None:
        watch.close()
        await assembly.respond(answer, send)
    elif answer.first_chunk is not None:
        usage = None if upstream.usage is None else StreamUsage(strip=upstream.usage == "strip")
        await _relay(request, answer, usage, send, watch)
    else:
        watch.close()
        await _buffered_answer(request, answer, send)


async def _buffered_answer(request: _RequestScope, answer: StartedAnswer, send: Send) -> None:
    """Answer a request whose engine answer was read whole (not a stream, or an engine error)."""
    answer.end_prefill_leg()
    state = request.state
    state.dispatcher.finish(request.key)
    upstream = answer.upstream
    if upstream.status != 200:
        request.count(upstream.status)
        body = state.engines[answer.key.engine].adapter.normalize_error(upstream.status, answer.body)
        await send_answer(send, upstream.status, fastjson.dumps(body), request.id_header)
        return
    elapsed = state.clock() - request.arrival
    request_log().ttft_s = elapsed
    state.metrics.observe_latency(request.model_label, elapsed, elapsed)
    request.class_ttft(elapsed)
    request.count(200)
    if "json" in upstream.content_type:
        request.usage_reported(_body_prompt_tokens(answer.body))
    content_type = _content_type(upstream.content_type or "application/json")
    await send_answer(send, 200, answer.body, request.id_header, content_type)


def _body_prompt_tokens(body: bytes) -> int | None:
    """``usage.prompt_tokens`` of an engine's JSON answer, or ``None``."""
    try:
        parsed = fastjson.loads(body)
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

    request: _RequestScope
    engine: str
    first_token_at: float | None = None

    def feed(self, chunk: bytes) -> bool:
        """Report ``chunk``; return whether it brought the stream's first event."""
        events = chunk.count(b"data:") - chunk.count(b"[DONE]")
        if events <= 0:
            return False
        request = self.request
        request.output_events += events
        dispatcher = request.state.dispatcher
        if self.first_token_at is not None:
            dispatcher.tokens(request.key, self.engine, events)
            return False
        self.first_token_at = request.state.clock()
        dispatcher.first_token(request.key, self.engine)
        if events > 1:
            dispatcher.tokens(request.key, self.engine, events - 1)
        return True


class _Assembly:
    """The non-streamed answer of a request the engine streams: reads each try's stream whole (the ``consume``
    of :func:`~gateway.server.retry.send_with_retries`), reporting progress as :func:`_relay` does, then answers
    with the JSON the engine would have sent non-streamed."""

    def __init__(self, request: _RequestScope) -> None:
        self.request = request
        self.assembler = CompletionAssembler(request.route)
        self.progress: _Progress | None = None

    async def __call__(self, answer: StartedAnswer) -> None:
        """Read the stream of one try to its end.

        Raises:
            UpstreamStatusError: the stream carried the engine's error event with a 5xx code (or none: 502).
            UpstreamError: the stream broke, went silent for ``upstream.idle_timeout_s`` (504), ended before
                ``[DONE]``, or carried an event that is not JSON.
        """
        state = self.request.state
        flavor = state.engines[answer.key.engine].config.flavor
        self.assembler = assembler = CompletionAssembler(self.request.route, tool_call_index=flavor == "sglang")
        self.progress = progress = _Progress(self.request, answer.key.engine)
        idle_timeout = state.settings.upstream.idle_timeout_s
        events = SSEEvents()
        done = False
        chunk = answer.first_chunk or b""
        while chunk:
            progress.feed(chunk)
            for raw in events.feed(chunk):
                data = event_payload(raw)
                if data is None or done:
                    continue
                if data.strip() == b"[DONE]":
                    done = True
                    continue
                try:
                    assembler.add(parse_event(data))
                except ValueError as exc:
                    raise UpstreamError(f"the engine's stream carried an event that is not JSON: {exc}") from exc
            chunk = await answer.upstream.next_chunk(idle_timeout)
        if assembler.error is not None:
            status = error_event_status(assembler.error)
            if status >= 500:  # as the engine's 5xx to a non-streamed request: tried again elsewhere
                adapter = state.engines[answer.key.engine].adapter
                raise UpstreamStatusError(status, adapter.normalize_error(status, fastjson.dumps(assembler.error)))
        elif not done:
            raise UpstreamError("the engine's stream ended before its end marker (data: [DONE])")

    async def respond(self, answer: StartedAnswer, send: Send) -> None:
        """Answer the client once the stream of ``answer``'s try was read whole."""
        answer.end_prefill_leg()
        request, state = self.request, self.request.state
        state.dispatcher.finish(request.key)
        now = state.clock()
        first_token_at = self.progress.first_token_at if self.progress is not None else None
        ttft = None if first_token_at is None else first_token_at - request.arrival
        if ttft is not None:
            request_log().ttft_s = ttft
            request.class_ttft(ttft)
        state.metrics.observe_latency(request.model_label, ttft, now - request.arrival)
        error = self.assembler.error
        if error is not None:
            status = error_event_status(error)
            request.count(status)
            body = state.engines[answer.key.engine].adapter.normalize_error(status, fastjson.dumps(error))
            await send_answer(send, status, fastjson.dumps(body), request.id_header)
            return
        result = self.assembler.result()
        request.usage_reported(reported_prompt_tokens(result.get("usage")))
        request.count(200)
        await send_answer(send, 200, fastjson.dumps(result), request.id_header)


async def _relay(
    request: _RequestScope, answer: StartedAnswer, usage: StreamUsage | None, send: Send, watch: DisconnectWatch
) -> None:
    """Relay a stream whose first chunk has arrived, chunk by chunk; end it with an SSE error event and
    ``[DONE]`` if the engine fails or stops before its own ``[DONE]`` (never a silent truncation). With
    ``usage``, the engine's usage is read (and, if the gateway asked for it, dropped) on the way."""
    state = request.state
    metrics = state.metrics
    key, upstream = answer.key, answer.upstream
    idle_timeout = state.settings.upstream.idle_timeout_s
    progress = _Progress(request, key.engine)
    status = "200"
    end = StreamEnd()
    chunk = answer.first_chunk or b""
    await send({"type": "http.response.start", "status": 200, "headers": [*_STREAM_HEADERS, *request.id_header]})
    try:
        while chunk:
            if progress.feed(chunk):
                ttft = progress.first_token_at - request.arrival if progress.first_token_at is not None else 0.0
                metrics.observe_latency(request.model_label, ttft, None)
                request.class_ttft(ttft)
                request_log().ttft_s = ttft
            relayed = chunk if usage is None else usage.feed(chunk)
            if relayed:
                end.feed(relayed)
                await send({"type": "http.response.body", "body": relayed, "more_body": True})
            chunk = await upstream.next_chunk(idle_timeout)
        if usage is not None and (rest := usage.rest()):
            end.feed(rest)
            await send({"type": "http.response.body", "body": rest, "more_body": True})
        if not end.done:
            raise UpstreamError("the engine's stream ended before its end marker (data: [DONE])")
    except UpstreamError as exc:
        status = "stream_error"
        record_failure(state, key, exc)
        if state.engines[key.engine].config.role == "decode":  # a P/D decode leg broke after its first byte
            metrics.pd_leg_failures.labels(key.engine, "decode", exc.failure_kind).inc()
        log.warning("stream %s from %s broke: %s", request.request_id, key, exc.message)
        closing = end.error_events(exc.message, exc.type, exc.status)
        await send({"type": "http.response.body", "body": closing, "more_body": True})
    except asyncio.CancelledError:
        status = "client_closed"
        if not watch.absorb():
            raise
    finally:
        upstream.close()
        answer.end_prefill_leg()
        state.dispatcher.finish(request.key)
        metrics.observe_latency(request.model_label, None, state.clock() - request.arrival)
        if usage is not None and status == "200":
            request.usage_reported(usage.prompt_tokens)
        request.count(status)
    if status != "client_closed":
        watch.close()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
