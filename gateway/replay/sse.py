"""Incremental Server-Sent Events decoding for the replay client.

Our own: no maintained library decodes SSE from aiohttp's byte chunks for a POST request (the aiohttp SSE
clients on PyPI are GET-only ``EventSource`` wrappers, httpx-sse is tied to httpx). The gateway itself never
decodes SSE: it relays engine bytes untouched.
"""

from __future__ import annotations


class SSEDecoder:
    """Incremental Server-Sent Events decoder: bytes in, the ``data`` of each complete event out.

    Lines end in LF or CRLF; ``data:`` lines of one event are joined with ``\\n``; a blank line ends the
    event; comments (``:``) and other fields (``event``, ``id``, ``retry``) are ignored. Chunk boundaries may
    fall anywhere, including inside a line or a UTF-8 character.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        """Add bytes; return the data of the events they complete."""
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        events: list[str] = []
        for raw in lines:
            line = raw.removesuffix(b"\r").decode("utf-8", errors="replace")
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif line.startswith("data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(" ") else value)
        return events

    def close(self) -> list[str]:
        """End of stream: return a last event left without its blank line (lenient)."""
        events = self.feed(b"\n\n") if self._buffer or self._data else []
        self._buffer = b""
        return events
