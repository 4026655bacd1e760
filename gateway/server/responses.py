"""The OpenAI Responses API through the gateway: ``POST /v1/responses`` (streamed and not), ``GET`` and ``DELETE
/v1/responses/{id}``, ``POST /v1/responses/{id}/cancel``.

A new response (no ``previous_response_id``) is placed as a chat completion is: its prompt tokens estimated from
``instructions`` and ``input`` read as chat messages, placed by the dispatcher (the window, the allocator), sent with
the same retries on other ranks while nothing reached the client (:func:`~gateway.server.retry.send_with_retries`),
and counted in the same metrics under ``route="responses"``. The engines keep a stored response in the memory of
the API-server process that answered it (``docs/responses.md``), so the gateway remembers the engine and DP rank
of every response id it relays (:class:`~gateway.server.responses_store.ResponseHomes`, bounded and expiring:
``responses.*``; with a scheduler service, shared through it, so that every front door of ``--workers N`` finds
it); a follow-up (``previous_response_id``) is sent to that rank at once, without the window (it can
go nowhere else) and without retries elsewhere, and so are a retrieval, a delete and a cancel. An id the gateway
does not know, or whose engine is no longer configured, is answered 404 ``response_not_found`` by the gateway
itself, never by asking some other engine. Models served by P/D engines are refused with 501: SGLang refuses its
response store in P/D mode, and vLLM's two-step P/D proxy protocol has no Responses form.

A streamed response is relayed byte for byte. It is made of ``event:``/``data:`` pairs and ends with a terminal
event (``response.completed``, ``response.incomplete``, ``response.failed`` or ``error``), not with ``[DONE]``: a
stream that ends before one gets an ``error`` event from the gateway. The ``*.delta`` events are the tokens the
scheduler is told of (the first one is the first token). The engine's ``usage.input_tokens`` feeds the prompt
estimate's correction only for a response without ``previous_response_id`` (a follow-up's prompt includes the
stored conversation, which the gateway does not see).

Tenants (``tenants`` configured) are charged as for a chat completion, through the same
:class:`~gateway.server.tenants.TenantAccount`: every ``POST``, follow-ups included, is admitted against its tenant's
requests and tokens limits (429 ``rate_limit_exceeded`` with ``Retry-After``) and carries the tenant's class; its TTFT
is observed in its class; when the answer ends the tokens bucket is settled with the response's ``usage``
(``input_tokens`` plus ``output_tokens``, from the JSON answer or the stream's terminal event; without it, the prompt
estimate plus the ``*.delta`` events, one a token, as the scheduler counts them). A follow-up skips the window, so no
class order applies to it, but the virtual token counter charges its prompt and output tokens as for a placed
request; a non-streamed answer's ``output_tokens``, which no stream reported, are charged to it when it arrives. A
retrieval, delete or cancel takes one request from the requests-a-minute limit, no tokens (it generates none).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.errors import (
    ClientDisconnected,
    GatewayError,
    InvalidRequestError,
    ModelNotFoundError,
    NotImplementedForModelError,
    RateLimitedError,
    ResponseNotFoundError,
    UpstreamError,
)
from gateway.logs import request_log
from gateway.scheduler_service.client import ServiceClient, ServiceUnavailable
from gateway.scheduler_service.remote import RemoteDispatcher
from gateway.scheduling.fairness import VirtualTokenCounter
from gateway.server import fastjson
from gateway.server.assemble import SSEEvents, event_payload
from gateway.server.disconnect import DisconnectWatch
from gateway.server.headers import upstream_request_headers
from gateway.server.openapi import json_body
from gateway.server.proxy import AnswerScope, read_body, send_answer
from gateway.server.responses_store import ResponseHome
from gateway.server.retry import StartedAnswer, record_failure, send_with_retries, try_once
from gateway.server.state import GatewayState, State
from gateway.server.tenants import TENANT_SCOPE_KEY, admit
from gateway.server.validation import load_json
from gateway.tokens import prompt_texts
from gateway.types import PendingRequest, RankKey, prefix_block_hashes

log = logging.getLogger(__name__)

PATH = "/v1/responses"
ROUTE = "responses"
"""The ``route`` label of the gateway's metrics for these requests."""
TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed", "error"})
"""The events that end a Responses stream (vLLM 0.34 ``responses/serving.py``, SGLang 0.5.23
``serving_responses.py``; ``error`` is the OpenAI stream's error event)."""
_REQUEST_ID = b"x-request-id"
_STREAM_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
_keys = itertools.count()

RESPONSES_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": {"type": "string", "minLength": 1, "description": "A model from GET /v1/models."},
        "input": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "minItems": 1, "items": {"anyOf": [{"type": "object"}, {"type": "string"}]}},
            ]
        },
        "instructions": {"type": ["string", "null"]},
        "previous_response_id": {"type": ["string", "null"], "minLength": 1},
        "stream": {"type": "boolean", "default": False},
        "store": {"type": "boolean", "default": True},
        "max_output_tokens": {"type": "integer", "minimum": 1, "description": "Output-token limit."},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "additionalProperties": True,
}
"""``POST /v1/responses`` body (for ``/openapi.json``; :func:`parse_responses_request` checks it)."""


@dataclass(slots=True)
class ParsedResponses:
    """A validated ``POST /v1/responses`` body.

    Attributes:
        body: the JSON body (forwarded, after rank pinning, to the engine).
        model: the requested model.
        stream: whether the client asked for a stream.
        max_output_tokens: the output-token limit the client set, or ``None``.
        previous_response_id: the response this one continues, or ``None``.
        store: whether the engine is asked to store the response (``store`` is ``true`` unless sent ``false``).
        messages: ``instructions`` and ``input`` as chat messages, for the prompt-token estimate.
    """

    body: dict[str, Any]
    model: str
    stream: bool
    max_output_tokens: int | None
    previous_response_id: str | None
    store: bool
    messages: list[dict[str, Any]]


def _optional(body: Mapping[str, Any], name: str, kind: type, what: str) -> Any:
    value = body.get(name)
    if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise InvalidRequestError(f"'{name}' must be {what}", param=name)
    return value


def input_messages(value: str | list[Any], instructions: str | None) -> list[dict[str, Any]]:
    """``instructions`` and a Responses ``input`` as chat messages (what the engines render them to): a string is a
    user message; a list item keeps its ``role`` and ``content``, a tool result (``output``) or a call
    (``arguments``) counts as its text."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    for item in [value] if isinstance(value, str) else value:
        if isinstance(item, str):
            messages.append({"role": "user", "content": item})
            continue
        content = item.get("content", item.get("output", item.get("arguments", "")))
        messages.append({"role": str(item.get("role", "user")), "content": content})
    return messages


def parse_responses_request(raw: bytes, *, max_tokens_limit: int | None = None) -> ParsedResponses:
    """Parse and validate a ``POST /v1/responses`` body: what the gateway needs (``model``, ``input``,
    ``instructions``, ``previous_response_id``, ``stream``, ``store``, ``max_output_tokens``); every other field is
    forwarded as sent.

    Raises:
        InvalidRequestError: not strict JSON in UTF-8, not an object, or one of those fields missing or mistyped, or
            ``max_output_tokens`` above ``max_tokens_limit``.
    """
    body = load_json(raw)
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    model = body.get("model")
    if model is None:
        raise InvalidRequestError("you must provide a model parameter", param="model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("'model' must be a non-empty string", param="model")
    value = body.get("input")
    if value is None:
        raise InvalidRequestError("'input' is a required property", param="input")
    if not isinstance(value, str | list) or (isinstance(value, list) and not value):
        raise InvalidRequestError("'input' must be a string or a non-empty array of input items", param="input")
    for i, item in enumerate(value if isinstance(value, list) else ()):
        if not isinstance(item, str | dict):
            raise InvalidRequestError(f"input[{i}] must be an object or a string", param=f"input[{i}]")
    instructions = _optional(body, "instructions", str, "a string")
    previous = _optional(body, "previous_response_id", str, "a string")
    if previous == "":
        raise InvalidRequestError("'previous_response_id' must not be empty", param="previous_response_id")
    stream = _optional(body, "stream", bool, "a boolean") or False
    store = _optional(body, "store", bool, "a boolean") is not False
    limit = _optional(body, "max_output_tokens", int, "a positive integer")
    if limit is not None and limit < 1:
        raise InvalidRequestError("'max_output_tokens' must be a positive integer", param="max_output_tokens")
    if limit is not None and max_tokens_limit is not None and limit > max_tokens_limit:
        raise InvalidRequestError(f"'max_output_tokens' must be at most {max_tokens_limit}", param="max_output_tokens")
    return ParsedResponses(body, model, stream, limit, previous, store, input_messages(value, instructions))


def _service(state: GatewayState) -> ServiceClient | None:
    """The scheduler service's client while this front door places through it, else ``None``."""
    dispatcher = state.dispatcher
    return dispatcher.client if isinstance(dispatcher, RemoteDispatcher) and dispatcher.remote else None


async def share_home(state: GatewayState, response_id: str, key: RankKey, model: str) -> None:
    """Tell the scheduler service, if this front door uses one, where ``response_id`` lives (a failure is logged:
    this front door still knows)."""
    service = _service(state)
    if service is None:
        return
    try:
        await service.remember_response(response_id, {"engine": key.engine, "rank": key.rank, "model": model})
    except ServiceUnavailable as exc:
        log.warning("could not share where response %s lives with the scheduler service: %s", response_id, exc)


async def find_home(state: GatewayState, response_id: str, param: str) -> ResponseHome:
    """Where the stored response ``response_id`` lives: in this front door's map, else in the scheduler service's
    (when it uses one, :mod:`gateway.scheduler_service.service`), which every front door shares.

    Raises:
        ResponseNotFoundError: the gateway does not know it, or its engine is no longer configured.
    """
    homes, now = state.response_homes, state.clock()
    home = homes.lookup(response_id, now)
    service = _service(state) if home is None else None
    if service is not None:
        try:
            shared = await service.response_home(response_id)
        except ServiceUnavailable as exc:
            log.warning("could not ask the scheduler service where response %s lives: %s", response_id, exc)
            shared = None
        if shared is not None:
            try:
                homes.remember(
                    response_id, RankKey(str(shared["engine"]), int(shared["rank"])), str(shared["model"]), now
                )
            except (KeyError, TypeError, ValueError):
                log.warning("the scheduler service answered an unknown home for response %s: %r", response_id, shared)
            home = homes.lookup(response_id, now)
    if home is None:
        raise ResponseNotFoundError(
            f"Response with id '{response_id}' not found: this gateway does not know which engine stores it "
            f"(never answered through it, or unused for {state.settings.responses.ttl_s:g} s and forgotten)",
            param=param,
        )
    if home.rank.engine not in state.engines:
        homes.forget(response_id)
        raise ResponseNotFoundError(
            f"Response with id '{response_id}' not found: the engine that stored it, {home.rank.engine}, is no "
            "longer served by this gateway",
            param=param,
        )
    return home


@dataclass(slots=True)
class _Call(AnswerScope):
    """One ``POST /v1/responses`` while it is handled."""

    key: str = field(default_factory=lambda: f"resp{next(_keys)}")
    """The gateway's own id for the request in the window and the load view."""
    input_tokens: int | None = None
    """The engine's ``usage.input_tokens`` for this response, ``None`` until seen."""
    output_tokens: int | None = None
    """The engine's ``usage.output_tokens`` for this response, ``None`` until seen."""

    def count(self, status: int | str) -> None:
        """Count the answer, and settle the tenant's tokens with the response's usage (the ``*.delta`` events for
        the output when the engine reported no ``output_tokens``)."""
        state = self.state
        state.metrics.count_request(ROUTE, self.model_label, str(status))
        if self.tenant is not None:
            output = self.output_events if self.output_tokens is None else self.output_tokens
            self.tenant.settle(status, self.estimated_prompt_tokens, self.input_tokens, output, state.clock())


async def serve_responses(state: GatewayState, scope: Scope, receive: Receive, send: Send) -> None:
    """Serve ``POST /v1/responses`` as a plain ASGI app (see the module docstring)."""
    call = _Call(state, request_log().request_id, state.clock())
    try:
        raw = await read_body(scope, receive, state.settings.max_body_bytes)
        parsed = parse_responses_request(raw, max_tokens_limit=state.settings.max_tokens_limit)
        if parsed.model not in state.models:
            raise ModelNotFoundError(f"The model `{parsed.model}` does not exist.", param="model")
        call.model_label = parsed.model
        if parsed.model in state.settings.pd_models():
            raise NotImplementedForModelError(
                f"the Responses API is not served for `{parsed.model}`: its engines are prefill and decode pools, "
                "which keep no response store (use /v1/chat/completions)",
                param="model",
            )
        home = None
        if parsed.previous_response_id is not None:
            home = await find_home(state, parsed.previous_response_id, "previous_response_id")
        chat = {"messages": parsed.messages}
        pending = PendingRequest(
            request_id=call.key,
            model=parsed.model,
            prompt_tokens=state.prompt_counter.count(parsed.model, chat),
            max_output_tokens=parsed.max_output_tokens or state.settings.default_max_tokens,
            arrival_s=call.arrival,
            stream=parsed.stream,
            prefix_blocks=prefix_block_hashes(prompt_texts(chat)),
        )
        call.estimated_prompt_tokens = pending.prompt_tokens
        tenant = scope.get(TENANT_SCOPE_KEY)
        if tenant is not None:
            call.tenant = admit(tenant, state.metrics, state.clock(), pending)
    except GatewayError as exc:
        await call.error(exc, send)
        return
    except ClientDisconnected:
        await call.client_closed(send)
        return
    watch = DisconnectWatch(receive)
    try:
        await _place_and_answer(call, parsed, pending, home, send, watch)
    finally:
        watch.close()


def _fairness(state: GatewayState) -> VirtualTokenCounter | None:
    """The tenants' virtual token counter of this front door's scheduler (tenants configured, policy ``sbs``), else
    ``None``. A windowed placement and the streamed tokens reach it through the dispatcher; what the dispatcher does
    not see is charged here: a follow-up's placement on its home rank, and a non-streamed answer's output tokens."""
    return state.dispatcher.scheduler.fairness


async def _send_home(state: GatewayState, pending: PendingRequest, key: RankKey, body: dict[str, Any]) -> StartedAnswer:
    """A follow-up's one try, on the rank that stores its conversation (no other engine has it), charged to its
    tenant's virtual token counter as a request the window placed (:meth:`VirtualTokenCounter.placed
    <gateway.scheduling.fairness.VirtualTokenCounter.placed>`: its prompt now, its output tokens as they come).

    Raises:
        UpstreamError: the try failed (counted against the rank's or engine's circuit breaker).
    """
    state.dispatcher.place_on(pending, key)
    fairness = _fairness(state)
    if fairness is not None:
        fairness.placed(pending)
    try:
        return await try_once(state, key, pending.stream, PATH, body, request_log().request_id)
    except UpstreamError as exc:
        state.dispatcher.finish(pending.request_id)
        record_failure(state, key, exc)
        raise
    except BaseException:
        state.dispatcher.finish(pending.request_id)
        raise


async def _place_and_answer(
    call: _Call,
    parsed: ParsedResponses,
    pending: PendingRequest,
    home: ResponseHome | None,
    send: Send,
    watch: DisconnectWatch,
) -> None:
    state = call.state
    entry = request_log()
    try:
        if home is None:
            placement = await state.dispatcher.acquire(pending)
            entry.window_id = placement.window_id
            entry.placed(placement.rank.engine, placement.rank.rank, state.clock() - call.arrival)
            answer = await send_with_retries(state, pending, placement.rank, PATH, parsed.body, call.request_id)
        else:
            entry.placed(home.rank.engine, home.rank.rank, 0.0)
            answer = await _send_home(state, pending, home.rank, parsed.body)
    except GatewayError as exc:
        watch.close()
        await call.error(exc, send)
        return
    except asyncio.CancelledError:
        if not watch.absorb():
            raise
        await call.client_closed(send)
        return
    tracker = _StreamTracker(call, parsed, answer.key)
    if answer.first_chunk is not None:
        await _relay(call, answer, tracker, send, watch)
        return
    watch.close()
    upstream = answer.upstream
    if upstream.status != 200:
        state.dispatcher.finish(pending.request_id)
        call.count(upstream.status)
        body = state.engines[answer.key.engine].adapter.normalize_error(upstream.status, answer.body)
        await send_answer(send, upstream.status, fastjson.dumps(body), call.id_header)
        return
    try:
        response = fastjson.loads(answer.body)
    except ValueError:
        response = None
    if isinstance(response, dict):
        tracker.response_seen(response)
    fairness = _fairness(state)
    if fairness is not None and call.output_tokens:  # no stream reported them as they came
        fairness.on_tokens(pending.request_id, call.output_tokens)
    state.dispatcher.finish(pending.request_id)
    elapsed = state.clock() - call.arrival
    request_log().ttft_s = elapsed
    state.metrics.observe_latency(call.model_label, elapsed, elapsed)
    call.class_ttft(elapsed)
    call.count(200)
    await tracker.share()
    await send_answer(send, 200, answer.body, call.id_header)


@dataclass(slots=True)
class _StreamTracker:
    """Reads a Responses answer on its way to the client: remembers the response's engine rank, reports tokens to
    the dispatcher, and watches for the terminal event and the usage."""

    call: _Call
    parsed: ParsedResponses
    key: RankKey
    events: SSEEvents = field(default_factory=SSEEvents)
    first_token_at: float | None = None
    ended: bool = False
    remembered: bool = False
    unshared: str | None = None
    """A response id remembered here and not yet told to the scheduler service (:meth:`share`)."""

    def response_seen(self, response: Mapping[str, Any]) -> None:
        """A ``response`` object (a JSON answer, or the one a stream event carries) came from the engine."""
        state = self.call.state
        response_id = response.get("id")
        if not self.remembered and self.parsed.store and isinstance(response_id, str) and response_id:
            state.response_homes.remember(response_id, self.key, self.parsed.model, state.clock())
            self.remembered = True
            self.unshared = response_id
        usage = response.get("usage")
        if not isinstance(usage, dict):
            return
        call = self.call
        reported, output = _usage_count(usage, "input_tokens"), _usage_count(usage, "output_tokens")
        if reported is not None:
            call.input_tokens = reported
            if self.parsed.previous_response_id is None:
                state.prompt_tokens_reported(call.model_label, call.estimated_prompt_tokens, reported)
        if output is not None:
            call.output_tokens = output

    async def share(self) -> None:
        """Tell the scheduler service where the response lives, before the client can learn its id."""
        if self.unshared is not None:
            response_id, self.unshared = self.unshared, None
            await share_home(self.call.state, response_id, self.key, self.parsed.model)

    def feed(self, chunk: bytes) -> bool:
        """Read ``chunk``; return whether it brought the first token."""
        tokens = 0
        for raw in self.events.feed(chunk):
            name = _event_name(raw)
            if name is not None and name.endswith(".delta"):
                tokens += 1
                continue
            data = event_payload(raw)
            if data is None:
                continue
            try:
                event = json.loads(data)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            kind = name or event.get("type")
            if isinstance(kind, str) and kind.endswith(".delta"):
                tokens += 1
            elif kind in TERMINAL_EVENTS:
                self.ended = True
            if isinstance(event.get("response"), dict):
                self.response_seen(event["response"])
        return self._report(tokens)

    def _report(self, tokens: int) -> bool:
        if tokens == 0:
            return False
        self.call.output_events += tokens
        state, key = self.call.state, self.call.key
        if self.first_token_at is not None:
            state.dispatcher.tokens(key, self.key.engine, tokens)
            return False
        self.first_token_at = state.clock()
        state.dispatcher.first_token(key, self.key.engine)
        if tokens > 1:
            state.dispatcher.tokens(key, self.key.engine, tokens - 1)
        return True


def _usage_count(usage: Mapping[str, Any], name: str) -> int | None:
    """``usage[name]`` (``input_tokens``, ``output_tokens``) when it is an integer, else ``None``."""
    value = usage.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _event_name(raw: bytes) -> str | None:
    """The ``event:`` field of one raw SSE event, or ``None``."""
    if not raw.startswith(b"event:"):
        return None
    line = raw.split(b"\n", 1)[0].rstrip(b"\r")
    return line[6:].strip().decode("utf-8", "replace")


def error_event(message: str, code: str) -> bytes:
    """The ``error`` event the gateway ends a broken Responses stream with (OpenAI's stream error event)."""
    payload = {"type": "error", "code": code, "message": message, "param": None, "sequence_number": -1}
    return b"event: error\ndata: " + fastjson.dumps(payload) + b"\n\n"


async def _relay(
    call: _Call, answer: StartedAnswer, tracker: _StreamTracker, send: Send, watch: DisconnectWatch
) -> None:
    """Relay a Responses stream whose first chunk has arrived; end it with an ``error`` event if the engine fails or
    stops before a terminal event."""
    state = call.state
    key, upstream = answer.key, answer.upstream
    idle_timeout = state.settings.upstream.idle_timeout_s
    status = "200"
    chunk = answer.first_chunk or b""
    await send({"type": "http.response.start", "status": 200, "headers": [*_STREAM_HEADERS, *call.id_header]})
    try:
        while chunk:
            if tracker.feed(chunk) and tracker.first_token_at is not None:
                ttft = tracker.first_token_at - call.arrival
                state.metrics.observe_latency(call.model_label, ttft, None)
                call.class_ttft(ttft)
                request_log().ttft_s = ttft
            await tracker.share()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            chunk = await upstream.next_chunk(idle_timeout)
        if not tracker.ended:
            raise UpstreamError("the engine's stream ended before its final event (response.completed)")
    except UpstreamError as exc:
        status = "stream_error"
        record_failure(state, key, exc)
        log.warning("responses stream %s from %s broke: %s", call.request_id, key, exc.message)
        closing = error_event(exc.message, "stream_error")
        await send({"type": "http.response.body", "body": closing, "more_body": True})
    except asyncio.CancelledError:
        status = "client_closed"
        if not watch.absorb():
            raise
    finally:
        upstream.close()
        state.dispatcher.finish(call.key)
        state.metrics.observe_latency(call.model_label, None, state.clock() - call.arrival)
        call.count(status)
    if status != "client_closed":
        watch.close()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


# -- the routes -----------------------------------------------------------------------------------------------

router = APIRouter()


class ResponsesAnswer(Response):
    """The answer to ``POST /v1/responses``: :func:`serve_responses` reads the request and answers it when
    Starlette calls the response."""

    def __init__(self, state: GatewayState) -> None:
        super().__init__()
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await serve_responses(self.state, scope, receive, send)


@router.post(PATH, response_model=None, openapi_extra=json_body(RESPONSES_REQUEST))
async def create_response(state: State) -> Response:
    """OpenAI Responses, streaming or not: a new response placed by the scheduler like a chat completion, a
    follow-up (``previous_response_id``) sent to the engine rank that stores the conversation."""
    return ResponsesAnswer(state)


async def _to_home(state: GatewayState, request: Request, method: str, response_id: str, suffix: str = "") -> Response:
    """Send a retrieval, delete or cancel of ``response_id`` to the engine that stores it and relay its answer
    (a stream, ``GET ...?stream=true`` of a background response, chunk by chunk). With tenants, the call first
    takes one request from its tenant's requests-a-minute limit (no tokens: it generates none)."""
    tenant = request.scope.get(TENANT_SCOPE_KEY)
    try:
        if tenant is not None:
            admit(tenant, state.metrics, state.clock())
        home = await find_home(state, response_id, "response_id")
    except RateLimitedError as exc:
        state.metrics.count_request(ROUTE, "unknown", str(exc.status))
        return JSONResponse(exc.body(), exc.status, {"retry-after": str(exc.retry_after_s)})
    except ResponseNotFoundError as exc:
        state.metrics.count_request(ROUTE, "unknown", str(exc.status))
        return JSONResponse(exc.body(), exc.status)
    engine = state.engines[home.rank.engine]
    query = request.url.query
    url = engine.url(f"{PATH}/{quote(response_id, safe='')}{suffix}") + (f"?{query}" if query else "")
    config = state.settings.upstream
    headers = upstream_request_headers(request_log().request_id)
    entry = request_log()
    entry.engine, entry.rank = home.rank.engine, home.rank.rank
    try:
        upstream = await state.client.send(
            method,
            url,
            None,
            headers,
            headers_timeout_s=config.first_byte_timeout_s,
            total_timeout_s=config.total_timeout_s,
        )
        if upstream.status == 200 and "text/event-stream" in upstream.content_type:
            state.metrics.count_request(ROUTE, home.model, "200")
            return StreamingResponse(_chunks(upstream, config.idle_timeout_s), media_type="text/event-stream")
        body = await upstream.read()
        upstream.close()
    except UpstreamError as exc:
        state.metrics.count_request(ROUTE, home.model, str(exc.status))
        return JSONResponse(exc.body(), exc.status)
    state.metrics.count_request(ROUTE, home.model, str(upstream.status))
    if upstream.status != 200:
        return JSONResponse(engine.adapter.normalize_error(upstream.status, body), upstream.status)
    if method == "DELETE":
        state.response_homes.forget(response_id)
    return Response(body, 200, media_type=upstream.content_type or "application/json")


async def _chunks(upstream: Any, idle_timeout_s: float) -> AsyncIterator[bytes]:
    try:
        while chunk := await upstream.next_chunk(idle_timeout_s):
            yield chunk
    except UpstreamError as exc:
        yield error_event(exc.message, "stream_error")
    finally:
        upstream.close()


@router.get(PATH + "/{response_id}", response_model=None)
async def retrieve_response(state: State, request: Request, response_id: str) -> Response:
    """A stored response, from the engine that stores it (``?stream=true&starting_after=N`` relayed to vLLM,
    which streams a background response's events)."""
    return await _to_home(state, request, "GET", response_id)


@router.delete(PATH + "/{response_id}", response_model=None)
async def delete_response(state: State, request: Request, response_id: str) -> Response:
    """Delete a stored response at the engine that stores it (neither vLLM 0.34 nor SGLang 0.5.23 serves it: their
    405 is passed on)."""
    return await _to_home(state, request, "DELETE", response_id)


@router.post(PATH + "/{response_id}/cancel", response_model=None)
async def cancel_response(state: State, request: Request, response_id: str) -> Response:
    """Cancel a background response at the engine that runs it."""
    return await _to_home(state, request, "POST", response_id, "/cancel")
