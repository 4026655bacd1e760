"""How an engine's SSE stream ended, and the events that close it cleanly for the client when it did not.

A stream from vLLM or SGLang ends with ``data: [DONE]`` (docs/design.md §4.3). One that breaks off (the connection
drops, or closes cleanly but early) or is not SSE at all must not look like a complete answer to the client:
the relay then appends an OpenAI-style error event and ``data: [DONE]``, after a blank line if the engine's
last event was cut, so the client's SSE parser sees the error as an event of its own. Only the last few bytes
relayed are kept, so watching costs next to nothing per chunk.
"""

from __future__ import annotations

import json

from gateway.errors import error_body

DONE_EVENT = b"data: [DONE]\n\n"
_TAIL_BYTES = 16


class StreamEnd:
    """Watches the bytes relayed from one engine stream (feed every chunk to :meth:`feed`)."""

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        """Note ``chunk`` as relayed to the client."""
        self._tail = (self._tail + chunk)[-_TAIL_BYTES:]

    @property
    def done(self) -> bool:
        """Whether the stream relayed so far ends with the ``data: [DONE]`` event."""
        return self._tail.rstrip(b"\r\n").endswith(b"data: [DONE]")

    def error_events(self, message: str, type_: str = "upstream_error", code: int = 502) -> bytes:
        """The bytes that end the stream for the client: an error event, then ``data: [DONE]``."""
        separator = b"" if not self._tail or self._tail.endswith((b"\n\n", b"\r\n\r\n")) else b"\n\n"
        event = json.dumps(error_body(message, type_, code=code)).encode()
        return separator + b"data: " + event + b"\n\n" + DONE_EVENT
