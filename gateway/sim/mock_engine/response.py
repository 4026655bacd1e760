"""The ASGI response of one generation: streams or collects its tokens, aborts it if the client leaves.

Written as a plain ASGI callable (a Starlette ``Response`` subclass overriding ``__call__``) rather than a
``StreamingResponse`` so that a client disconnect is seen at once, even while the request is still queued
and no token is being sent: one task produces the answer, another watches ``receive()`` for
``http.disconnect``; whichever ends first cancels the other. On any exit before the last token the request is
aborted in the engine model (frees its KV) and counted as aborted, like vLLM and SGLang do.

A P/D leg (:mod:`gateway.sim.mock_engine.pd`) gives the response a ``prepare`` step, awaited before anything is
sent (the KV handoff; an error it returns is the answer), a ``cleanup`` run on every exit, and fields to add to
the non-streamed body.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.sim.mock_engine.faults import GenerateFault, InjectedCrash, wait_for_disconnect
from gateway.sim.mock_engine.protocol import (
    GenerationRequest,
    completion_response,
    final_chunks,
    sse_event,
    token_chunks,
    usage_chunk,
)
from gateway.sim.mock_engine.runtime import EngineRuntime, GenerationHandle


class GenerationResponse(Response):
    """Answer one accepted generation request (JSON, or SSE when ``request.stream``).

    Args:
        runtime: the engine runtime the request was submitted to.
        handle: the submitted request.
        request: the parsed request (shapes the answer).
        response_id: ``chatcmpl-<hex>`` / ``cmpl-<hex>``.
        created: Unix time of creation, seconds.
        fault: an injected fault, ``kill_mid_stream``, ``end_without_done`` or ``stall_mid_stream`` (see
            :mod:`gateway.sim.mock_engine.faults`), or ``"ok"``.
        after_chunks: token events sent before the fault strikes.
        prepare: awaited before anything is sent; returns None to answer normally, or the error response to send.
        cleanup: called once when the response ends, however it ends.
        extra: fields added to the top level of a non-streamed answer.
    """

    def __init__(
        self,
        runtime: EngineRuntime,
        handle: GenerationHandle,
        request: GenerationRequest,
        response_id: str,
        created: int,
        fault: GenerateFault = "ok",
        after_chunks: int = 0,
        *,
        prepare: Callable[[], Awaitable[Response | None]] | None = None,
        cleanup: Callable[[], None] | None = None,
        extra: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.status_code = 200
        self.background = None
        self.media_type = "text/event-stream" if request.stream else "application/json"
        self.init_headers({"cache-control": "no-cache"} if request.stream else None)
        self._runtime = runtime
        self._handle = handle
        self._request = request
        self._id = response_id
        self._created = created
        self._fault = fault
        self._after_chunks = after_chunks
        self._prepare = prepare
        self._cleanup = cleanup
        self._extra = extra

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        produce = asyncio.ensure_future(self._answer(scope, receive, send))
        watch = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            done, _ = await asyncio.wait({produce, watch}, return_when=asyncio.FIRST_COMPLETED)
            if produce in done and not isinstance(produce.exception(), OSError):
                # re-raise a bug, or an InjectedCrash (the server then drops the connection); OSError = closed
                # connection (ASGI spec >= 2.4 servers)
                produce.result()
        finally:
            for task in (produce, watch):
                task.cancel()
            self._runtime.abort(self._handle)  # no-op when it finished
            await asyncio.gather(produce, watch, return_exceptions=True)
            if self._cleanup is not None:
                self._cleanup()

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._prepare is not None and (error := await self._prepare()) is not None:
            self._runtime.abort(self._handle)
            await error(scope, receive, send)
            return
        await (self._stream(send) if self._request.stream else self._collect(send))

    async def _collect(self, send: Send) -> None:
        while not (await self._handle.events.get()).finished:
            pass
        answer = completion_response(self._request, self._id, self._created)
        if self._extra is not None:
            answer |= self._extra()
        body = json.dumps(answer).encode()
        headers = [(b"content-length", str(len(body)).encode()), *self.raw_headers]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if self._fault == "kill_mid_stream":
            await _send_body(send, body[: len(body) // 2])
            raise InjectedCrash("killed mid-answer")
        await _send_body(send, body, more=False)

    async def _stream(self, send: Send) -> None:
        req, rid, created = self._request, self._id, self._created
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        sent = 0
        while True:
            if sent == self._after_chunks and self._fault == "kill_mid_stream":
                raise InjectedCrash("killed mid-stream")
            if sent == self._after_chunks and self._fault == "end_without_done":
                await _send_body(send, b"", more=False)
                return
            if sent == self._after_chunks and self._fault == "stall_mid_stream":
                await asyncio.Event().wait()  # until the client leaves and this task is cancelled
            event = await self._handle.events.get()
            chunks = token_chunks(req, rid, created, event.index)
            await _send_body(send, b"".join(sse_event(chunk) for chunk in chunks))
            sent += 1
            if event.finished:
                break
        tail = b"".join(sse_event(chunk) for chunk in final_chunks(req, rid, created))
        if req.include_usage:
            tail += sse_event(usage_chunk(req, rid, created))
        await _send_body(send, tail + sse_event("[DONE]"), more=False)


async def _send_body(send: Send, body: bytes, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": more})
