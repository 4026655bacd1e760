"""The OpenAI-compatible wire protocol of the simulated engines: request parsing and response shapes.

Pure functions, no web framework: a request body (bytes) and headers in, a :class:`GenerationRequest` or a
:class:`ProtocolError` out; response objects and SSE chunks as plain dicts.

Flavours differ where the real engines differ (docs/design.md §4.1, §4.2):

- rank pinning: vLLM reads the header ``X-data-parallel-rank``; SGLang reads the body field
  ``routed_dp_rank`` (or the older ``data_parallel_rank``);
- error bodies: vLLM ``{"error": {"message", "type", "param", "code"}}``; SGLang a flat
  ``{"object": "error", "message", "type", "param", "code"}``;
- how a choice says why it stopped, beside ``finish_reason``: vLLM ``stop_reason`` (the stop string or token
  that matched, ``null`` for EOS and length; vllm/entrypoints/openai/chat_completion/serving.py), SGLang
  ``matched_stop`` (the EOS token id for a natural stop, absent for length; serving_chat.py
  ``_build_chat_response``), on the non-streamed choice and on the streamed chunk that finishes the choice.

Logprobs, when asked (chat ``logprobs: true`` with ``top_logprobs`` alternatives; completions ``logprobs: k``), in
vLLM's shapes (``ChatCompletionLogProbs`` / ``CompletionLogProbs``, vllm/entrypoints/openai/chat_completion/protocol.py
and completion/protocol.py), the same in both flavours: chat ``{"content": [{"token", "logprob", "bytes",
"top_logprobs": [...]}]}``; completions ``{"text_offset", "token_logprobs", "tokens", "top_logprobs"}``, offsets
counted from the answer's start. A streamed chunk carries its own token's entries. The values are made up
(:func:`token_logprob`), deterministic per token position.

Tool calls: a chat request naming a function in ``tool_choice`` (or ``"required"``, which calls the first of its
``tools``) is answered with one call of it whose ``arguments`` are ``{"text": "<the tokens>"}``: streamed as
``delta.tool_calls`` (the ``id``, ``type`` and ``function.name`` with the first piece of the arguments, then one
piece a token, the closing ``"}`` on the finishing chunk), non-streamed as ``message.tool_calls`` with ``content``
``""``. As the engines differ: a natural stop finishes as ``"tool_calls"``, except vLLM's named call (``"stop"``;
vllm/entrypoints/openai/chat_completion/serving.py); ids are vLLM's ``chatcmpl-tool-<hex>`` (``make_tool_call_id``)
and SGLang's ``call_<24 hex>``, and SGLang's non-streamed call carries its ``index`` (serving_chat.py
``_process_tool_calls``).

``n`` choices (``n`` > 1) share one generation in the engine model (the simulated engine's load is that of one
sequence; the real engines run ``n``): every choice gets the same tokens. As both engines stream them, each chunk
carries one choice, the choices of one step interleaved by ``index``; ``usage`` counts the prompt once and the
output tokens of every choice (vLLM ``chat_completion_stream_generator``; SGLang
``UsageProcessor.calculate_streaming_usage``).

Prompt tokens and prefix blocks (:func:`prompt_blocks`): by default the prompt is counted with the gateway's own
estimator (:func:`gateway.tokens.count_prompt_tokens`) and its prefix blocks are hashed from its text, four characters
a token; with DeepSeek-V3's tokenizer (``MockEngineConfig.tokenizer``) the prompt is rendered with the chat template
and encoded, as the engine does, and the blocks are hashes of its token ids, as vLLM's and SGLang's prefix caches see
them.

Output length: with ``ignore_eos`` exactly ``max_tokens``; otherwise ``min(max_tokens, max(min_tokens, L))``
where L, the length at which the simulated model "emits EOS", is 16..256 tokens derived from a BLAKE2 hash of
the seed and the prompt, so the same prompt always gives the same answer length.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from gateway.tokens import CHARS_PER_TOKEN, count_prompt_tokens

Flavor = Literal["sglang", "vllm"]
"""Which real engine's HTTP surface a simulated engine imitates."""

RequestKind = Literal["chat", "completion"]
"""``/v1/chat/completions`` or ``/v1/completions``."""

TOKEN_TEXT = " tok"
"""The text of every generated token: 4 characters, so the gateway's CharTokenizer counts it as 1 token."""

DEFAULT_MAX_TOKENS = 256
"""Output limit when a request gives none, tokens (our choice; vLLM would use the rest of the context)."""

NATURAL_LENGTH_MIN = 16
"""Shortest hash-derived answer length, tokens."""

NATURAL_LENGTH_MAX = 256
"""Longest hash-derived answer length, tokens."""

VLLM_RANK_HEADER = "x-data-parallel-rank"
"""vLLM's rank-pinning header (case-insensitive; vllm/entrypoints/openai/api_server.py)."""

SGLANG_RANK_FIELDS = ("routed_dp_rank", "data_parallel_rank")
"""SGLang's rank-pinning body fields, newest first."""

SGLANG_EOS_TOKEN_ID = 1
"""The ``matched_stop`` SGLang reports for a natural stop: the EOS token's id (DeepSeek-V3's
``<｜end▁of▁sentence｜>`` is 1 in its tokenizer.json)."""

MAX_N = 16
"""Most choices a request may ask for (``n``); our bound, the engines take more."""

MAX_LOGPROBS = 20
"""Most alternatives per token a request may ask for: vLLM's default ``max_logprobs`` (vllm/config/model.py)."""

ALTERNATIVE_TOKENS = tuple(f" alt{i}" for i in range(MAX_LOGPROBS))
"""The made-up tokens offered as less likely alternatives in ``top_logprobs``."""


PrefixTokenizer = Literal["estimate", "deepseek"]
"""Whose count a simulated engine gives a prompt: the gateway's estimator, or DeepSeek-V3's tokenizer."""

MIN_PREFIX_BLOCK_TOKENS = 16
"""Tokens per prefix block the mock engine hashes at least: the engine's KV block when larger (vLLM), else this
(SGLang's radix cache matches single tokens; hashing each token would cost a hash per token, so a shared prefix is
found to within 16 tokens)."""


class TokenIdEncoder(Protocol):
    """What the mock engine needs of a real tokenizer (:class:`gateway.workload.tokenizer.DeepSeekTokenizer`)."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, special-token strings recognised, no BOS added."""
        ...


def _chained(chunks: Iterator[bytes]) -> tuple[int, ...]:
    """Chained 8-byte BLAKE2b hashes: each covers its chunk and every chunk before it."""
    blocks: list[int] = []
    previous = b""
    for chunk in chunks:
        previous = hashlib.blake2b(previous + chunk, digest_size=8).digest()
        blocks.append(int.from_bytes(previous, "big"))
    return tuple(blocks)


def _prompt_text(body: Mapping[str, Any]) -> str:
    """The prompt's text for text-block hashing: the messages' text parts with their roles, or the prompt strings."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        for m in messages:
            if not isinstance(m, Mapping):
                continue
            content = m.get("content")
            parts.append(str(m.get("role", "")) + "\0")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts += [p["text"] for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str)]
        return "".join(parts)
    prompt = body.get("prompt")
    items: Sequence[Any] = [prompt] if isinstance(prompt, str) else prompt if isinstance(prompt, list) else []
    return "\0".join(p if isinstance(p, str) else json.dumps(p) for p in items)


def prompt_blocks(
    body: Mapping[str, Any], block_tokens: int | None, tokenizer: TokenIdEncoder | None = None
) -> tuple[int, tuple[int, ...]]:
    """The prompt tokens of a request body and its prefix blocks (chained hashes, one per ``block_tokens`` tokens;
    see :meth:`gateway.sim.engine_model.EngineModel.add_request`); ``block_tokens=None`` skips the blocks.

    With ``tokenizer``: the body rendered as DeepSeek-V3's engine renders it (chat template; a completion prompt
    as is) and encoded; the blocks hash the token ids. Without: the gateway's estimate, and blocks of
    ``block_tokens`` x 4 characters of the prompt's text (two prompts that share their leading text share their
    leading blocks, to the estimator's resolution).
    """
    if tokenizer is None:
        tokens = count_prompt_tokens(body)
        if block_tokens is None:
            return tokens, ()
        text = _prompt_text(body).encode()
        step = block_tokens * CHARS_PER_TOKEN
        return tokens, _chained(text[i : i + step] for i in range(0, len(text), step))
    from gateway.workload.tokenizer import render_chat

    messages = body.get("messages")
    prompt = body.get("prompt")
    ids: list[int]
    if isinstance(messages, list):
        ids = tokenizer.encode(render_chat([m for m in messages if isinstance(m, Mapping)]))
    elif isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(p, int) for p in prompt):
        ids = list(prompt)
    else:
        ids = [t for p in prompt or () for t in (tokenizer.encode(p) if isinstance(p, str) else list(p))]
    if block_tokens is None:
        return len(ids), ()
    data = b"".join(t.to_bytes(4, "little") for t in ids)
    step = block_tokens * 4
    return len(ids), _chained(data[i : i + step] for i in range(0, len(data), step))


class ProtocolError(Exception):
    """A request the engine refuses, with the HTTP status and OpenAI error fields to answer with."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param


def bad_request(message: str, param: str | None = None) -> ProtocolError:
    """A 400 ``BadRequestError``."""
    return ProtocolError(400, message, "BadRequestError", param)


def error_body(flavor: Flavor, error: ProtocolError) -> dict[str, Any]:
    """The JSON body of an error response in the flavour's shape (see the module docstring)."""
    fields = {"message": error.message, "type": error.type, "param": error.param, "code": error.status}
    if flavor == "vllm":
        return {"error": fields}
    return {"object": "error", **fields}


@dataclass(frozen=True)
class GenerationRequest:
    """A validated generation request.

    Attributes:
        kind: chat or completion.
        model: model name to echo in responses.
        prompt_tokens: prompt length by the CharTokenizer heuristic, at least 1, tokens.
        max_tokens: the request's output limit, tokens.
        output_tokens: how many tokens the simulated model will generate, tokens (1..max_tokens).
        finish_reason: ``"length"`` if ``output_tokens`` reaches ``max_tokens``, else ``"stop"``.
        stream: answer as server-sent events.
        include_usage: with ``stream``, send a final usage chunk (``stream_options.include_usage``).
        rank: the DP rank the request is pinned to, or None to let the engine choose.
        ignore_eos: the request asked to ignore end-of-sequence (SGLang's admission then reserves its whole
            ``max_tokens``).
        prefix_blocks: the prompt's prefix blocks (:func:`prompt_blocks`); empty unless asked for.
        n: how many choices the answer has (they share one generation, see the module docstring).
        flavor: the engine flavour answering (shapes ``stop_reason`` / ``matched_stop``).
        logprobs: alternatives per token when logprobs were asked for (0: the chosen token's only), else None.
        tool_call: the function the answer calls (see the module docstring), or None for a text answer.
        tool_choice_named: ``tool_choice`` named the function (rather than ``"required"``).
    """

    kind: RequestKind
    model: str
    prompt_tokens: int
    max_tokens: int
    output_tokens: int
    finish_reason: Literal["length", "stop"]
    stream: bool
    include_usage: bool
    rank: int | None
    ignore_eos: bool = False
    prefix_blocks: tuple[int, ...] = ()
    n: int = 1
    flavor: Flavor = "vllm"
    logprobs: int | None = None
    tool_call: str | None = None
    tool_choice_named: bool = False


def natural_length(body: Mapping[str, Any], seed: int) -> int:
    """The hash-derived answer length of a body's prompt, ``NATURAL_LENGTH_MIN..NATURAL_LENGTH_MAX``."""
    prompt = body.get("messages", body.get("prompt"))
    text = json.dumps([seed, prompt], sort_keys=True, separators=(",", ":"), default=str)
    digest = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
    return NATURAL_LENGTH_MIN + digest % (NATURAL_LENGTH_MAX - NATURAL_LENGTH_MIN + 1)


def _int_field(body: Mapping[str, Any], name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise bad_request(f"{name} must be an integer >= {minimum}, got {value!r}", name)
    return value


def _bool_field(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be a boolean, got {value!r}", name)
    return value


def _parse_rank(raw: object, source: str, dp_size: int) -> int:
    if isinstance(raw, str):
        try:
            raw = int(raw.strip())
        except ValueError:
            raise bad_request(f"{source} must be an integer, got {raw!r}", source) from None
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise bad_request(f"{source} must be an integer, got {raw!r}", source)
    if not 0 <= raw < dp_size:
        raise bad_request(f"data_parallel_rank {raw} is out of range [0, {dp_size}).", source)
    return raw


def pinned_rank(flavor: Flavor, body: Mapping[str, Any], headers: Mapping[str, str], dp_size: int) -> int | None:
    """The DP rank a request is pinned to, or None.

    Raises:
        ProtocolError: 400 if the pin is not an integer or is outside ``[0, dp_size)``.
    """
    if flavor == "vllm":
        header = next((v for k, v in headers.items() if k.lower() == VLLM_RANK_HEADER), None)
        return None if header is None else _parse_rank(header, "X-data-parallel-rank", dp_size)
    for name in SGLANG_RANK_FIELDS:
        if body.get(name) is not None:
            return _parse_rank(body[name], name, dp_size)
    return None


def parse_generation_request(
    *,
    kind: RequestKind,
    raw_body: bytes,
    headers: Mapping[str, str],
    flavor: Flavor,
    served_model: str,
    dp_size: int,
    max_model_len: int,
    seed: int,
    prefix_block_tokens: int | None = None,
    tokenizer: TokenIdEncoder | None = None,
) -> GenerationRequest:
    """Validate a ``/v1/chat/completions`` or ``/v1/completions`` request; its prompt is counted (and, with
    ``prefix_block_tokens``, cut into prefix blocks) by :func:`prompt_blocks` with ``tokenizer``.

    Raises:
        ProtocolError: 400 for a malformed body, bad field, bad rank pin or a request longer than
            ``max_model_len``; 404 for a model other than ``served_model`` (an absent model is accepted).
    """
    try:
        body = json.loads(raw_body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"Request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("Request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served_model:
        raise ProtocolError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("messages must be a non-empty list", "messages")
    elif not isinstance(body.get("prompt"), str | list):
        raise bad_request("prompt must be a string or a list", "prompt")
    n = _int_field(body, "n", 1) or 1
    if n > MAX_N:
        raise bad_request(f"n must be at most {MAX_N}, got {n}", "n")
    max_tokens = (_int_field(body, "max_completion_tokens", 1) if kind == "chat" else None) or _int_field(
        body, "max_tokens", 1
    )
    max_tokens = max_tokens or DEFAULT_MAX_TOKENS
    min_tokens = _int_field(body, "min_tokens", 0) or 0
    if min_tokens > max_tokens:
        raise bad_request(f"min_tokens ({min_tokens}) must be <= max_tokens ({max_tokens})", "min_tokens")
    counted, prefix_blocks = prompt_blocks(body, prefix_block_tokens, tokenizer)
    prompt_tokens = max(1, counted)
    if prompt_tokens + max_tokens > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
            "completion). Please reduce the length of the messages or completion.",
            "max_tokens",
        )
    stream = _bool_field(body, "stream")
    options = body.get("stream_options")
    include_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    ignore_eos = _bool_field(body, "ignore_eos")
    logprobs: int | None
    if kind == "chat":
        top = _int_field(body, "top_logprobs", 0)
        logprobs = (top or 0) if _bool_field(body, "logprobs") else None
    else:
        logprobs = _int_field(body, "logprobs", 0)
    if logprobs is not None and logprobs > MAX_LOGPROBS:
        raise bad_request(f"at most {MAX_LOGPROBS} logprobs may be asked for, got {logprobs}", "logprobs")
    tool_call, named = _tool_call(body) if kind == "chat" else (None, False)
    output_tokens = max_tokens if ignore_eos else min(max_tokens, max(min_tokens, natural_length(body, seed)))
    return GenerationRequest(
        kind=kind,
        model=model if isinstance(model, str) else served_model,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        output_tokens=output_tokens,
        finish_reason="length" if output_tokens >= max_tokens else "stop",
        stream=stream,
        include_usage=include_usage,
        rank=pinned_rank(flavor, body, headers, dp_size),
        ignore_eos=ignore_eos,
        prefix_blocks=prefix_blocks,
        n=n,
        flavor=flavor,
        logprobs=logprobs,
        tool_call=tool_call,
        tool_choice_named=named,
    )


def _tool_call(body: Mapping[str, Any]) -> tuple[str | None, bool]:
    """The function a chat body makes the answer call, and whether ``tool_choice`` named it.

    Raises:
        ProtocolError: 400 for a ``tool_choice`` that names no listed tool, or ``"required"`` without tools.
    """
    choice = body.get("tool_choice")
    tools = body.get("tools")
    names = [
        t["function"]["name"]
        for t in (tools if isinstance(tools, list) else [])
        if isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
    ]
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if name not in names:
            raise bad_request(f"Tool '{name}' not found in tools list.", "tool_choice")
        return name, True
    if choice == "required":
        if not names:
            raise bad_request("Tools cannot be empty if tool choice is set to required.", "tool_choice")
        return names[0], False
    return None, False


def usage(req: GenerationRequest, completion_tokens: int) -> dict[str, int]:
    """The OpenAI ``usage`` object, for ``completion_tokens`` per choice."""
    completion = completion_tokens * req.n
    return {
        "prompt_tokens": req.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": req.prompt_tokens + completion,
    }


def _finish_reason(req: GenerationRequest) -> str:
    """``finish_reason`` of every choice (a tool call's, see the module docstring)."""
    if req.tool_call is None or req.finish_reason != "stop":
        return req.finish_reason
    return "stop" if req.flavor == "vllm" and req.tool_choice_named else "tool_calls"


def _stop_detail(req: GenerationRequest) -> dict[str, Any]:
    """The flavour's field beside ``finish_reason`` (see the module docstring)."""
    if req.flavor == "vllm":
        return {"stop_reason": None}
    return {"matched_stop": SGLANG_EOS_TOKEN_ID} if _finish_reason(req) == "stop" else {}


ARGUMENTS_OPEN = '{"text": "'
ARGUMENTS_CLOSE = '"}'


def _tool_call_id(req: GenerationRequest, response_id: str) -> str:
    hex_part = response_id.rsplit("-", 1)[-1]
    return f"chatcmpl-tool-{hex_part}" if req.flavor == "vllm" else f"call_{hex_part[:24]}"


def _tool_call_message(req: GenerationRequest, response_id: str, text: str) -> dict[str, Any]:
    call: dict[str, Any] = {"id": _tool_call_id(req, response_id)}
    if req.flavor == "sglang":
        call["index"] = 0
    call["type"] = "function"
    call["function"] = {"name": req.tool_call, "arguments": ARGUMENTS_OPEN + text + ARGUMENTS_CLOSE}
    return {"role": "assistant", "content": "", "tool_calls": [call]}


def _tool_call_delta(req: GenerationRequest, response_id: str, index: int) -> dict[str, Any]:
    if index == 0:
        call = {
            "id": _tool_call_id(req, response_id),
            "type": "function",
            "index": 0,
            "function": {"name": req.tool_call, "arguments": ARGUMENTS_OPEN + TOKEN_TEXT},
        }
        return {"role": "assistant", "content": "", "tool_calls": [call]}
    return {"tool_calls": [{"index": 0, "function": {"arguments": TOKEN_TEXT}}]}


def token_logprob(index: int) -> float:
    """The made-up logprob of output token ``index``: -0.01 to -1.00, cycling, so tokens differ."""
    return -round(0.01 * (index % 100 + 1), 2)


def _chat_logprob(req: GenerationRequest, index: int) -> dict[str, Any]:
    chosen = token_logprob(index)
    top = [(TOKEN_TEXT, chosen), *((t, chosen - 1.0 - i) for i, t in enumerate(ALTERNATIVE_TOKENS))]
    return {
        "token": TOKEN_TEXT,
        "logprob": chosen,
        "bytes": list(TOKEN_TEXT.encode()),
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top[: req.logprobs or 0]],
    }


def _completion_top_logprobs(index: int, k: int) -> dict[str, float]:
    """The chosen token and ``k`` alternatives (vLLM's completions list the sampled token beside the top ``k``)."""
    chosen = token_logprob(index)
    alternatives = ((t, chosen - 1.0 - j) for j, t in enumerate(ALTERNATIVE_TOKENS[:k]))
    return dict([(TOKEN_TEXT, chosen), *alternatives])


def _logprobs(req: GenerationRequest, first: int, count: int) -> dict[str, Any] | None:
    """The ``logprobs`` of output tokens ``first`` .. ``first + count - 1``, or None when not asked for."""
    if req.logprobs is None:
        return None
    indices = range(first, first + count)
    if req.kind == "chat":
        return {"content": [_chat_logprob(req, i) for i in indices]}
    return {
        "text_offset": [i * len(TOKEN_TEXT) for i in indices],
        "token_logprobs": [token_logprob(i) for i in indices],
        "tokens": [TOKEN_TEXT] * count,
        "top_logprobs": [_completion_top_logprobs(i, req.logprobs) for i in indices],
    }


def _envelope(req: GenerationRequest, response_id: str, created: int, chunk: bool) -> dict[str, Any]:
    obj = "text_completion"
    if req.kind == "chat":
        obj = "chat.completion.chunk" if chunk else "chat.completion"
    return {"id": response_id, "object": obj, "created": created, "model": req.model}


def completion_response(req: GenerationRequest, response_id: str, created: int) -> dict[str, Any]:
    """The non-streaming ``chat.completion`` / ``text_completion`` object for a finished request."""
    text = TOKEN_TEXT * req.output_tokens
    choices = []
    for index in range(req.n):
        choice: dict[str, Any] = {"index": index}
        if req.kind == "chat":
            choice["message"] = (
                {"role": "assistant", "content": text}
                if req.tool_call is None
                else _tool_call_message(req, response_id, text)
            )
        else:
            choice["text"] = text
        choice.update(
            logprobs=_logprobs(req, 0, req.output_tokens), finish_reason=_finish_reason(req), **_stop_detail(req)
        )
        choices.append(choice)
    return {
        **_envelope(req, response_id, created, chunk=False),
        "choices": choices,
        "usage": usage(req, req.output_tokens),
    }


def token_chunks(req: GenerationRequest, response_id: str, created: int, index: int) -> list[dict[str, Any]]:
    """The SSE chunks carrying output token ``index``, one per choice (the first chat chunk of a choice also
    carries the role)."""
    chunks = []
    for choice_index in range(req.n):
        choice: dict[str, Any] = {"index": choice_index}
        if req.kind == "chat" and req.tool_call is not None:
            choice["delta"] = _tool_call_delta(req, response_id, index)
        elif req.kind == "chat":
            delta = {"role": "assistant", "content": TOKEN_TEXT} if index == 0 else {"content": TOKEN_TEXT}
            choice["delta"] = delta
        else:
            choice["text"] = TOKEN_TEXT
        choice.update(logprobs=_logprobs(req, index, 1), finish_reason=None)
        chunks.append({**_envelope(req, response_id, created, chunk=True), "choices": [choice]})
    return chunks


def final_chunks(req: GenerationRequest, response_id: str, created: int) -> list[dict[str, Any]]:
    """The SSE chunks with each choice's ``finish_reason`` and no new text."""
    chunks = []
    for choice_index in range(req.n):
        choice: dict[str, Any] = {"index": choice_index}
        if req.kind == "chat" and req.tool_call is not None:
            choice["delta"] = {"tool_calls": [{"index": 0, "function": {"arguments": ARGUMENTS_CLOSE}}]}
        elif req.kind == "chat":
            choice["delta"] = {}
        else:
            choice["text"] = ""
        choice.update(logprobs=None, finish_reason=_finish_reason(req), **_stop_detail(req))
        chunks.append({**_envelope(req, response_id, created, chunk=True), "choices": [choice]})
    return chunks


def usage_chunk(req: GenerationRequest, response_id: str, created: int) -> dict[str, Any]:
    """The last SSE chunk under ``stream_options.include_usage``: no choices, just ``usage``."""
    return {
        **_envelope(req, response_id, created, chunk=True),
        "choices": [],
        "usage": usage(req, req.output_tokens),
    }


def sse_event(payload: Mapping[str, Any] | str) -> bytes:
    """Encode one server-sent event: ``data: <json>\\n\\n`` (a string payload is sent as is)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
