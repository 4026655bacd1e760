"""Reading an engine's SSE stream: the non-streamed answer assembled from it, and the usage it reports.

The gateway asks the engine for a stream even when the client asked for one JSON answer (``upstream.
stream_nonstreamed``), so the scheduler sees the request's first token and its step boundaries; this module turns
the stream's chunks back into the answer the engine would have sent non-streamed. It also finds the usage an
engine streams, and drops it from a client's stream that did not ask for it (``upstream.stream_usage``).

What the engines stream (vLLM ``vllm/entrypoints/openai/chat_completion/serving.py`` and
``completion/serving.py``, ``chat_completion_stream_generator`` / ``completion_stream_generator``; SGLang
``python/sglang/srt/entrypoints/openai/serving_chat.py`` / ``serving_completions.py`` and ``sse_utils.py``):

- ``data: {json}`` events, one choice per chunk, choices of ``n > 1`` interleaved by ``index``; ``data: [DONE]``
  last. A chat chunk carries a ``delta`` (``role`` once, ``content``, ``reasoning_content`` (SGLang, older vLLM)
  or ``reasoning`` (vLLM 0.11+), ``tool_calls`` with their own ``index``, the ``id``/``type``/``function.name``
  once and ``function.arguments`` in pieces); a completion chunk a ``text`` piece.
- ``logprobs`` per chunk covers that chunk's tokens: chat ``{"content": [...]}``; completions ``{"tokens",
  "token_logprobs", "top_logprobs", "text_offset"}`` (vLLM's ``text_offset`` already counts from the start of
  the answer), so each list concatenates into the whole answer's.
- ``finish_reason`` on a choice's last chunk; with it vLLM sends ``stop_reason``, SGLang ``matched_stop``
  (SGLang sends every choice's finish chunk after the last token of all).
- With ``stream_options.include_usage`` a last chunk with ``"choices": []`` and ``usage`` (totals over the
  choices); vLLM puts its ``system_fingerprint`` there too. With ``continuous_usage_stats`` vLLM (only together
  with ``include_usage``) and SGLang (alone as well) also put ``usage`` on every chunk.
- An error after the stream began is an event ``{"error": {...}}``, followed by ``[DONE]``.

What cannot be assembled: fields only the non-streamed answer carries (SGLang's ``metadata.weight_version``;
vLLM's ``prompt_logprobs`` and ``kv_transfer_params``, sent as ``null`` unless asked for).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

Route = Literal["chat", "completions"]

DONE = "[DONE]"
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
"""A non-null ``usage`` in an event's bytes: only such events are parsed when a relayed stream is watched."""
_OBJECTS: dict[Route, str] = {"chat": "chat.completion", "completions": "text_completion"}
_ENVELOPE = frozenset({"id", "object", "created", "model", "choices", "usage"})
_CHOICE_OWN = frozenset({"index", "delta", "text", "logprobs", "finish_reason"})


class SSEEvents:
    """Splits an SSE byte stream into whole events, whatever the chunk boundaries (events end with a blank line:
    LF LF, CRLF CRLF or CR CR)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """Add bytes; return the raw events they complete, each with its blank line."""
        self._buffer += chunk
        events: list[bytes] = []
        start = 0
        for match in _EVENT_END.finditer(self._buffer):
            events.append(self._buffer[start : match.end()])
            start = match.end()
        self._buffer = self._buffer[start:]
        return events

    @property
    def pending(self) -> bool:
        """Whether the bytes of an unfinished event are buffered."""
        return bool(self._buffer)

    def rest(self) -> bytes:
        """The bytes of an event left without its blank line (the stream ended, or was cut, inside it)."""
        rest, self._buffer = self._buffer, b""
        return rest


def event_payload(raw: bytes) -> bytes | None:
    """The ``data`` of one raw SSE event (its ``data:`` lines joined with LF), as bytes, or ``None`` when it has
    none (a comment or another field)."""
    body = raw.rstrip(b"\r\n")
    if body.startswith(b"data:") and b"\n" not in body and b"\r" not in body:  # one line: the engines' events
        return body[5:].removeprefix(b" ")
    lines = [
        line[5:].removeprefix(b" ") for line in raw.splitlines() if line.startswith(b"data:")
    ]  # one space after the colon is part of the framing (WHATWG HTML, "Server-sent events", §9.2.6)
    if not lines:
        return None
    return b"\n".join(lines)


def event_data(raw: bytes) -> str | None:
    """The ``data`` of one raw SSE event (:func:`event_payload`) decoded (invalid UTF-8 replaced), or ``None``."""
    data = event_payload(raw)
    return None if data is None else data.decode("utf-8", errors="replace")


def parse_event(data: bytes) -> Any:
    """An event's ``data`` parsed as JSON, as ``json.loads(data.decode("utf-8", errors="replace"))`` parses it
    (orjson first, :mod:`gateway.server.fastjson`).

    Raises:
        ValueError: not JSON.
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data.decode("utf-8", errors="replace"))


def ends_event(chunk: bytes) -> bool:
    """Whether :class:`SSEEvents`, fed ``chunk`` with nothing buffered, would find an event end at its very end
    (an LF LF or CRLF CRLF after a character that is not a line break), leaving nothing buffered."""
    if chunk.endswith(b"\r\n\r\n"):
        return len(chunk) > 4 and chunk[-5] not in b"\r\n"
    return chunk.endswith(b"\n\n") and len(chunk) > 2 and chunk[-3] not in b"\r\n"


def error_event_status(event: dict[str, Any]) -> int:
    """The HTTP status of an engine's error event: its ``code`` when that is an HTTP error status, else 502."""
    fields = event.get("error", event)
    code = fields.get("code") if isinstance(fields, dict) else None
    return code if isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 600 else 502


def leading_error(chunk: bytes) -> tuple[dict[str, Any], bytes] | None:
    """The engine's error event and its raw data when it is the first event of a stream's first ``chunk``, else
    ``None``. SGLang and vLLM answer an error they meet after sending the headers (an internal error, a failed
    P/D KV transfer) as HTTP 200 with one error event and ``[DONE]``; as the first event nothing has reached the
    client yet, so the try can fail and be retried. A first event whose bytes do not hold ``error`` is not parsed."""
    end = _EVENT_END.search(chunk)
    if end is None or b"error" not in chunk[: end.end()]:
        return None
    data = event_data(chunk[: end.end()])
    if data is None:
        return None
    try:
        event = json.loads(data)
    except ValueError:
        return None
    if isinstance(event, dict) and ("error" in event or event.get("object") == "error") and "choices" not in event:
        return event, data.encode()
    return None


def _last(previous: Any, value: Any) -> Any:
    return previous if value is None else value


@dataclass(slots=True)
class _ToolCall:
    id: str | None = None
    type: str | None = None
    name: str | None = None
    arguments: list[str] = field(default_factory=list)

    def add(self, delta: dict[str, Any]) -> None:
        self.id = self.id or delta.get("id")
        self.type = self.type or delta.get("type")
        function = delta.get("function")
        if isinstance(function, dict):
            self.name = self.name or function.get("name")
            if isinstance(function.get("arguments"), str):
                self.arguments.append(function["arguments"])

    def result(self, index: int | None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id}
        if index is not None:
            out["index"] = index
        out["type"] = self.type or "function"
        out["function"] = {"name": self.name, "arguments": "".join(self.arguments)}
        return out


@dataclass(slots=True)
class _Choice:
    """One choice as its chunks arrive."""

    index: int
    role: str | None = None
    texts: dict[str, list[str]] = field(default_factory=dict)
    """Every string field of the deltas (``content``, ``reasoning_content``...) or, for completions, ``text``."""
    tool_calls: dict[int, _ToolCall] = field(default_factory=dict)
    delta_other: dict[str, Any] = field(default_factory=dict)
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    other: dict[str, Any] = field(default_factory=dict)
    """Every other field of the choice (``stop_reason``, ``matched_stop``, ``token_ids``...)."""

    def add(self, chunk: dict[str, Any]) -> None:
        delta = chunk.get("delta")
        if isinstance(delta, dict):
            self._add_delta(delta)
        if isinstance(chunk.get("text"), str):
            self.texts.setdefault("text", []).append(chunk["text"])
        logprobs = chunk.get("logprobs")
        if isinstance(logprobs, dict):
            self._add_logprobs(logprobs)
        self.finish_reason = _last(self.finish_reason, chunk.get("finish_reason"))
        for key, value in chunk.items():
            if key in _CHOICE_OWN:
                continue
            if key == "token_ids" and isinstance(value, list):
                self.other[key] = [*(self.other.get(key) or ()), *value]
            else:
                self.other[key] = _last(self.other.get(key), value)

    def _add_delta(self, delta: dict[str, Any]) -> None:
        for key, value in delta.items():
            if key == "role":
                self.role = self.role or value
            elif key == "tool_calls" and isinstance(value, list):
                for position, call in enumerate(value):
                    if isinstance(call, dict):
                        index = call.get("index", position)
                        self.tool_calls.setdefault(index if isinstance(index, int) else position, _ToolCall()).add(call)
            elif isinstance(value, str):
                self.texts.setdefault(key, []).append(value)
            else:
                self.delta_other[key] = _last(self.delta_other.get(key), value)

    def _add_logprobs(self, logprobs: dict[str, Any]) -> None:
        if self.logprobs is None:
            self.logprobs = {}
        for key, value in logprobs.items():
            previous = self.logprobs.get(key)
            if isinstance(value, list):
                self.logprobs[key] = [*(previous or ()), *value]
            else:
                self.logprobs[key] = _last(previous, value)

    def result(self, route: Route, tool_call_index: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        if route == "chat":
            message: dict[str, Any] = {"role": self.role or "assistant"}
            message["content"] = "".join(self.texts["content"]) if "content" in self.texts else None
            for key, parts in self.texts.items():
                if key != "content":
                    message[key] = "".join(parts)
            for key, value in self.delta_other.items():
                message.setdefault(key, value)
            if self.tool_calls:
                message["tool_calls"] = [
                    self.tool_calls[i].result(i if tool_call_index else None) for i in sorted(self.tool_calls)
                ]
            out["message"] = message
        else:
            out["text"] = "".join(self.texts.get("text", ()))
        out["logprobs"] = self.logprobs
        out["finish_reason"] = self.finish_reason
        out.update(self.other)
        return out


class CompletionAssembler:
    """Builds a non-streamed ``chat.completion`` (``route="chat"``) or ``text_completion`` from the parsed
    ``data`` objects of the engine's stream, fed in order with :meth:`add` (not ``[DONE]``).

    The answer has the stream's ``id``, ``created`` and ``model`` (first chunk), the non-streamed ``object``,
    the choices in ``index`` order, ``usage`` (the usage-only chunk's, else the last chunk's that carried one),
    and every other top-level field with its last non-null value (``system_fingerprint``...).

    Args:
        route: which endpoint's answer to build.
        tool_call_index: give each assembled tool call its ``index``, as SGLang's non-streamed answer does
            (``ToolCall(id=..., index=..., function=...)`` in serving_chat.py ``_process_tool_calls``); vLLM's
            and OpenAI's carry none.
    """

    def __init__(self, route: Route, *, tool_call_index: bool = False) -> None:
        self.route = route
        self.tool_call_index = tool_call_index
        self._envelope: dict[str, Any] = {}
        self._choices: dict[int, _Choice] = {}
        self._final_usage: dict[str, Any] | None = None
        self._chunk_usage: dict[str, Any] | None = None
        self._other: dict[str, Any] = {}
        self.error: dict[str, Any] | None = None
        """The engine's error event, if the stream carried one."""

    def add(self, chunk: Any) -> None:
        """Take one parsed event; an object that is not a JSON object is ignored. An error event (vLLM's
        ``{"error": {...}}``, SGLang's flat ``{"object": "error", ...}``) is kept in :attr:`error`."""
        if not isinstance(chunk, dict):
            return
        if ("error" in chunk or chunk.get("object") == "error") and "choices" not in chunk:
            self.error = chunk
            return
        if len(self._envelope) < 3:
            for key in ("id", "created", "model"):
                if key not in self._envelope and chunk.get(key) is not None:
                    self._envelope[key] = chunk[key]
        choices = chunk.get("choices")
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            if choices:
                self._chunk_usage = usage
            else:
                self._final_usage = usage
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, dict):
                index = choice.get("index", 0)
                index = index if isinstance(index, int) else 0
                self._choices.setdefault(index, _Choice(index)).add(choice)
        for key, value in chunk.items():
            if key not in _ENVELOPE and key != "error":
                self._other[key] = _last(self._other.get(key), value)

    @property
    def usage(self) -> dict[str, Any] | None:
        """The usage the engine reported, or ``None``."""
        return self._final_usage if self._final_usage is not None else self._chunk_usage

    def result(self) -> dict[str, Any]:
        """The assembled answer."""
        answer: dict[str, Any] = {
            "id": self._envelope.get("id"),
            "object": _OBJECTS[self.route],
            "created": self._envelope.get("created"),
            "model": self._envelope.get("model"),
            "choices": [self._choices[i].result(self.route, self.tool_call_index) for i in sorted(self._choices)],
        }
        if self.usage is not None:
            answer["usage"] = self.usage
        for key, value in self._other.items():
            answer.setdefault(key, value)
        return answer


def assemble(route: Route, events: Iterable[Any], *, tool_call_index: bool = False) -> dict[str, Any]:
    """The non-streamed answer of a whole stream's parsed ``data`` objects (see :class:`CompletionAssembler`)."""
    assembler = CompletionAssembler(route, tool_call_index=tool_call_index)
    for event in events:
        assembler.add(event)
    return assembler.result()


def reported_prompt_tokens(usage: Any) -> int | None:
    """``usage.prompt_tokens`` when it is an integer, else ``None``."""
    if not isinstance(usage, dict):
        return None
    value = usage.get("prompt_tokens")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class StreamUsage:
    """Watches a relayed stream for the usage the engine reports and, with ``strip``, removes it: the
    usage-only chunk (``"choices": []``) is dropped and a ``usage`` on any other chunk deleted, so a client that
    did not ask for usage sees the stream it would have had.

    Only events whose bytes hold a non-null ``usage`` object are parsed. Without ``strip`` the chunks are relayed
    as they came; with it, whole events only (a partial event waits for its end, :meth:`rest` gives it back).
    """

    def __init__(self, *, strip: bool) -> None:
        self.strip = strip
        self.prompt_tokens: int | None = None
        """The latest ``usage.prompt_tokens`` seen."""
        self._events = SSEEvents()

    def feed(self, chunk: bytes) -> bytes:
        """Watch ``chunk``; return the bytes to relay for it."""
        if not self._events.pending:
            at = chunk.find(b'"usage"')
            if at < 0 and ends_event(chunk):
                return chunk  # whole events, none with usage: what the event by event path below would give
            cut = chunk.rfind(b"\n\n", 0, at) + 2
            if at > 0 and cut > 2 and ends_event(chunk[:cut]):  # whole events without usage, then the rest
                return chunk[:cut] + self._feed_events(chunk[cut:])
        return self._feed_events(chunk)

    def _feed_events(self, chunk: bytes) -> bytes:
        if not self.strip:
            for raw in self._events.feed(chunk):
                if _USAGE_OBJECT.search(raw):
                    self._read(raw)
            return chunk
        out: list[bytes] = []
        for raw in self._events.feed(chunk):
            out.append(self._read(raw) if _USAGE_OBJECT.search(raw) else raw)
        return b"".join(out)

    def rest(self) -> bytes:
        """What is left of a cut event at the end of the stream (relayed as it is, with ``strip``)."""
        rest = self._events.rest()
        return rest if self.strip else b""

    def _read(self, raw: bytes) -> bytes:
        data = event_payload(raw)
        try:
            chunk = parse_event(data) if data is not None and data != b"[DONE]" else None
        except ValueError:
            return raw
        if not isinstance(chunk, dict) or not isinstance(chunk.get("usage"), dict):
            return raw
        tokens = reported_prompt_tokens(chunk["usage"])
        self.prompt_tokens = tokens if tokens is not None else self.prompt_tokens
        if not self.strip:
            return raw
        if not chunk.get("choices"):
            return b""
        del chunk["usage"]
        return b"data: " + json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
