"""The OpenAI Responses API of a simulated engine, as vLLM 0.34 and SGLang 0.5.23 serve it.

Endpoints (both flavours; neither engine serves ``DELETE /v1/responses/{id}``, so neither does the mock):
``POST /v1/responses`` (JSON, or SSE with ``stream``), ``GET /v1/responses/{id}``, ``POST /v1/responses/{id}/cancel``.
The facts, with the engines' files, are in ``docs/responses.md``; what the mock does with them:

- The store is one in-memory dict per server process (vLLM ``OpenAIServingResponses.response_store``, SGLang the
  same name in ``serving_responses.py``), shared by every DP rank, never expired. It is off by default, as in the
  engines (vLLM ``VLLM_ENABLE_RESPONSES_API_STORE=1``, SGLang ``--enable-response-store``):
  :attr:`~gateway.sim.mock_engine.app.MockEngineConfig.response_store`. Off, vLLM silently stores nothing (a
  ``previous_response_id`` or a retrieve then gets 404) and SGLang refuses ``previous_response_id`` and retrieval
  with 400.
- A follow-up (``previous_response_id``) is rendered after the stored conversation (its input messages and its
  output), so its prompt grows with the conversation, as in the engines.
- A new response is pinned to a DP rank as a chat completion is (vLLM ``X-data-parallel-rank``, SGLang
  ``routed_dp_rank``), or placed by the engine's own rule. Per DP rank the mock counts the responses created
  and the follow-ups served (``GET /_sim/requests``, ``responses``), which shows where a router sent them.
- Streams are ``event: <type>`` / ``data: <json>`` pairs without ``data: [DONE]``: ``response.created``,
  ``response.in_progress``, ``response.output_item.added``, ``response.content_part.added``, one
  ``response.output_text.delta`` a token, ``response.output_text.done``, ``response.content_part.done``,
  ``response.output_item.done``, then ``response.completed`` (``response.incomplete`` when ``max_output_tokens``
  cut the answer: vLLM 0.34 ``serving.py``) carrying the whole response with ``usage`` (``input_tokens``,
  ``output_tokens``, ``total_tokens``).
- ``background`` is not simulated (answered 400).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from starlette.types import Send

from gateway.sim.mock_engine.protocol import (
    SGLANG_RANK_FIELDS,
    TOKEN_TEXT,
    GenerationRequest,
    ProtocolError,
    bad_request,
    parse_generation_request,
)
from gateway.sim.mock_engine.response import GenerationResponse

if TYPE_CHECKING:
    from gateway.sim.mock_engine.app import _MockEngine

RESPONSE_ID_PREFIX = "resp_"
"""Both engines name a response ``resp_<uuid>`` (vLLM ``ResponsesRequest.request_id``; SGLang
``_request_id_prefix``); SGLang refuses an id without the prefix with 400."""


def _error(flavor: str, status: int, message: str, type_: str, param: str | None) -> JSONResponse:
    """An error on a Responses route: both engines answer ``{"error": {...}}`` there (SGLang too, unlike its flat
    errors elsewhere: ``http_server.py`` ``validation_exception_handler``)."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}}, status)


def _message_items(value: Any, param: str) -> list[dict[str, Any]]:
    """The chat messages of a Responses ``input`` (a string, or a list of message items and strings).

    Raises:
        ProtocolError: 400 when ``input`` is neither.
    """
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise bad_request(f"{param} must be a string or a list of input items", param)
    messages = []
    for item in value:
        if isinstance(item, str):
            messages.append({"role": "user", "content": item})
        elif isinstance(item, Mapping):
            content = item.get("content", item.get("output", ""))
            if isinstance(content, list):
                content = "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
            messages.append({"role": str(item.get("role", "user")), "content": str(content)})
        else:
            raise bad_request(f"{param} items must be objects or strings", param)
    return messages


class ResponsesEndpoints:
    """The Responses routes of one simulated engine and its store (see the module docstring)."""

    def __init__(self, engine: _MockEngine) -> None:
        self.engine = engine
        cfg = engine.config
        self.enabled = cfg.response_store
        self.stored: dict[str, dict[str, Any]] = {}
        """Response id → the response object as answered."""
        self.conversations: dict[str, list[dict[str, Any]]] = {}
        """Response id → the chat messages its answer ended (input and output), for its follow-ups."""
        self.created = [0] * cfg.dp_size
        self.followups = [0] * cfg.dp_size
        self.retrieved = 0
        self.not_found = 0

    def counters(self) -> dict[str, object]:
        """Per DP rank the responses created and the follow-ups served; retrievals and unknown ids, since start."""
        return {
            "created": self.created,
            "followups": self.followups,
            "retrieved": self.retrieved,
            "not_found": self.not_found,
            "stored": len(self.stored),
        }

    def _flavor_error(self, exc: ProtocolError) -> JSONResponse:
        return _error(self.engine.config.flavor, exc.status, exc.message, exc.type, exc.param)

    def _store_disabled(self, param: str) -> JSONResponse:
        """SGLang's refusal when its store is off (``_response_store_disabled_error``)."""
        message = (
            "Response store is disabled. Stateful Responses require --enable-response-store on a standalone "
            "server; response storage is unavailable in PD mode."
        )
        return _error("sglang", 400, message, "invalid_request_error", param)

    def _not_found(self, response_id: str) -> JSONResponse:
        self.not_found += 1
        message = f"Response with id '{response_id}' not found."
        return _error(self.engine.config.flavor, 404, message, "invalid_request_error", "response_id")

    def _refuse_id(self, response_id: str, param: str) -> JSONResponse | None:
        """SGLang refuses ids without the ``resp_`` prefix; vLLM looks them up like any other."""
        if self.engine.config.flavor == "sglang" and not response_id.startswith(RESPONSE_ID_PREFIX):
            message = f"Invalid '{param}': '{response_id}'. Expected an ID that begins with 'resp'."
            return _error("sglang", 400, message, "invalid_request_error", param)
        return None

    async def create(self, request: Request) -> Response:
        """``POST /v1/responses``."""
        eng = self.engine
        cfg = eng.config
        if not eng.serving:
            return _error(cfg.flavor, 503, "The engine is not running.", "ServiceUnavailableError", None)
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(cfg.flavor, 400, f"Request body is not valid JSON: {exc}", "BadRequestError", None)
        if not isinstance(body, dict):
            return _error(cfg.flavor, 400, "Request body must be a JSON object", "BadRequestError", None)
        previous_id = body.get("previous_response_id")
        history: list[dict[str, Any]] = []
        if previous_id is not None:
            if not isinstance(previous_id, str):
                return _error(cfg.flavor, 400, "previous_response_id must be a string", "BadRequestError", None)
            if not self.enabled and cfg.flavor == "sglang":
                return self._store_disabled("previous_response_id")
            if (refused := self._refuse_id(previous_id, "previous_response_id")) is not None:
                return refused
            if previous_id not in self.conversations:
                return self._not_found(previous_id)
            history = list(self.conversations[previous_id])
        try:
            if body.get("background") is True:
                raise bad_request("background responses are not simulated", "background")
            if "input" not in body:
                raise bad_request("Field required: input", "input")
            messages = _message_items(body["input"], "input")
            instructions = body.get("instructions")
            if instructions is not None and not isinstance(instructions, str):
                raise bad_request("instructions must be a string", "instructions")
            system = [{"role": "system", "content": instructions}] if instructions else []
            chat: dict[str, Any] = {"model": body.get("model"), "messages": system + history + messages}
            for name in ("max_output_tokens", "stream", "ignore_eos", *SGLANG_RANK_FIELDS):
                if body.get(name) is not None:
                    chat["max_tokens" if name == "max_output_tokens" else name] = body[name]
            req = parse_generation_request(
                kind="chat",
                raw_body=json.dumps(chat).encode(),
                headers=request.headers,
                flavor=cfg.flavor,
                served_model=cfg.model,
                dp_size=cfg.dp_size,
                max_model_len=cfg.max_model_len,
                seed=cfg.seed,
                prefix_block_tokens=eng.prefix_block_tokens,
            )
            rank = req.rank if req.rank is not None else eng.pick_rank()
            handle = eng.submit(rank, req)
        except ProtocolError as exc:
            return self._flavor_error(exc)
        except ValueError as exc:
            return self._flavor_error(bad_request(str(exc), "max_output_tokens"))
        (eng.placed if req.rank is None else eng.pinned)[rank] += 1
        (self.followups if previous_id is not None else self.created)[rank] += 1
        given = body.get("request_id")
        response_id = f"{RESPONSE_ID_PREFIX}{uuid.uuid4().hex}"
        if cfg.flavor == "vllm" and isinstance(given, str) and given:  # vLLM names the response after request_id
            response_id = given
        store = self.enabled and body.get("store", True) is not False
        shape = _Shape(body, instructions, previous_id)
        conversation = chat["messages"]
        return ResponsesAnswer(self, eng, handle, req, response_id, shape, conversation if store else None)

    def keep(self, response: dict[str, Any], conversation: list[dict[str, Any]], text: str) -> None:
        """Store a finished response and the conversation its follow-ups continue."""
        self.stored[response["id"]] = response
        self.conversations[response["id"]] = [*conversation, {"role": "assistant", "content": text}]

    async def retrieve(self, response_id: str) -> Response:
        """``GET /v1/responses/{response_id}``."""
        if not self.enabled and self.engine.config.flavor == "sglang":
            return self._store_disabled("response_id")
        if (refused := self._refuse_id(response_id, "response_id")) is not None:
            return refused
        response = self.stored.get(response_id)
        if response is None:
            return self._not_found(response_id)
        self.retrieved += 1
        return JSONResponse(response)

    async def cancel(self, response_id: str) -> Response:
        """``POST /v1/responses/{response_id}/cancel``: only background responses can be cancelled, and the mock
        has none in progress, so a stored response is answered as SGLang does (as it is) or as vLLM does (400)."""
        flavor = self.engine.config.flavor
        if not self.enabled and flavor == "sglang":
            return self._store_disabled("response_id")
        if (refused := self._refuse_id(response_id, "response_id")) is not None:
            return refused
        response = self.stored.get(response_id)
        if response is None:
            return self._not_found(response_id)
        if flavor == "vllm":
            return _error(flavor, 400, "Cannot cancel a synchronous response.", "invalid_request_error", "response_id")
        return JSONResponse(response)


class _Shape:
    """The request fields a response object echoes."""

    def __init__(self, body: Mapping[str, Any], instructions: str | None, previous_id: str | None) -> None:
        self.instructions = instructions
        self.previous_id = previous_id
        self.max_output_tokens = body.get("max_output_tokens")
        self.store = body.get("store", True) is not False
        self.metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else None


def response_object(
    req: GenerationRequest,
    response_id: str,
    created: int,
    shape: _Shape,
    status: str,
    output_tokens: int | None,
) -> dict[str, Any]:
    """A Responses ``response`` object: ``output_tokens`` generated (``None``: none yet, no output, no usage)."""
    output: list[dict[str, Any]] = []
    usage = None
    if output_tokens is not None:
        output = [_message_item(response_id, TOKEN_TEXT * output_tokens, "completed")]
        usage = {
            "input_tokens": req.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": req.prompt_tokens + output_tokens,
        }
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "model": req.model,
        "status": status,
        "incomplete_details": incomplete,
        "error": None,
        "instructions": shape.instructions,
        "max_output_tokens": shape.max_output_tokens,
        "metadata": shape.metadata,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": shape.previous_id,
        "store": shape.store,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
    }


def _message_item(response_id: str, text: str, status: str) -> dict[str, Any]:
    done = status != "in_progress"
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if done else []
    return {
        "id": f"msg_{response_id.removeprefix(RESPONSE_ID_PREFIX)}",
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": content,
    }


def _event(event_type: str, sequence: int, **fields: Any) -> bytes:
    payload = {"type": event_type, "sequence_number": sequence, **fields}
    return f"event: {event_type}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


class ResponsesAnswer(GenerationResponse):
    """Answer one accepted ``POST /v1/responses`` (JSON, or the Responses SSE events): the token loop, the abort
    on a client that leaves and the cleanup are :class:`GenerationResponse`'s."""

    def __init__(
        self,
        endpoints: ResponsesEndpoints,
        engine: _MockEngine,
        handle: Any,
        req: GenerationRequest,
        response_id: str,
        shape: _Shape,
        conversation: list[dict[str, Any]] | None,
    ) -> None:
        super().__init__(engine.runtime, handle, req, response_id, int(time.time()))
        self._endpoints = endpoints
        self._shape = shape
        self._conversation = conversation

    def _final(self, output_tokens: int) -> dict[str, Any]:
        req = self._request
        status = "incomplete" if req.finish_reason == "length" else "completed"
        response = response_object(req, self._id, self._created, self._shape, status, output_tokens)
        if self._conversation is not None:
            self._endpoints.keep(response, self._conversation, TOKEN_TEXT * output_tokens)
        return response

    async def _collect(self, send: Send) -> None:
        while not (await self._handle.events.get()).finished:
            pass
        body = json.dumps(self._final(self._request.output_tokens)).encode()
        headers = [(b"content-length", str(len(body)).encode()), *self.raw_headers]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _stream(self, send: Send) -> None:
        req, rid = self._request, self._id
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        seq = iter(range(1 << 30))
        start = response_object(req, rid, self._created, self._shape, "in_progress", None)
        item_id = f"msg_{rid.removeprefix(RESPONSE_ID_PREFIX)}"
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        opening = (
            _event("response.created", next(seq), response=start)
            + _event("response.in_progress", next(seq), response=start)
            + _event(
                "response.output_item.added", next(seq), output_index=0, item=_message_item(rid, "", "in_progress")
            )
            + _event("response.content_part.added", next(seq), **where, part=part)
        )
        await send({"type": "http.response.body", "body": opening, "more_body": True})
        sent = 0
        while True:
            event = await self._handle.events.get()
            delta = _event("response.output_text.delta", next(seq), **where, delta=TOKEN_TEXT, logprobs=[])
            await send({"type": "http.response.body", "body": delta, "more_body": True})
            sent += 1
            if event.finished:
                break
        final = self._final(sent)
        text = TOKEN_TEXT * sent
        terminal = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        closing = (
            _event("response.output_text.done", next(seq), **where, text=text, logprobs=[])
            + _event("response.content_part.done", next(seq), **where, part={**part, "text": text})
            + _event("response.output_item.done", next(seq), output_index=0, item=final["output"][0])
            + _event(terminal, next(seq), response=final)
        )
        await send({"type": "http.response.body", "body": closing, "more_body": False})
