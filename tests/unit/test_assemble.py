"""The non-streamed answer assembled from an engine's stream, on event sequences shaped as vLLM and SGLang stream
them (vLLM ``vllm/entrypoints/openai/chat_completion/serving.py`` and ``completion/serving.py``, chunks dumped with
``exclude_unset``; SGLang ``serving_chat.py`` / ``serving_completions.py`` and ``sse_utils.build_sse_content``),
and the usage read from, and stripped out of, a relayed stream."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.server.assemble import (
    CompletionAssembler,
    SSEEvents,
    StreamUsage,
    assemble,
    error_event_status,
    event_data,
    leading_error,
    reported_prompt_tokens,
)

VLLM = {"id": "chatcmpl-7", "object": "chat.completion.chunk", "created": 1700000000, "model": "m"}
SGLANG = {"id": "9f2c", "object": "chat.completion.chunk", "created": 1700000001, "model": "m"}
VLLM_CMPL = {"id": "cmpl-3", "object": "text_completion", "created": 1700000002, "model": "m"}


def _chunk(envelope: dict[str, Any], *choices: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**envelope, "choices": list(choices), **extra}


def _lp(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": []}


def test_vllm_chat_n2_with_logprobs_interleaved_by_index() -> None:
    events = [
        _chunk(
            VLLM, {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        ),
        _chunk(
            VLLM, {"index": 1, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        ),
        _chunk(VLLM, {"index": 0, "delta": {"content": "Hel"}, "logprobs": {"content": [_lp("Hel", -0.1)]}}),
        _chunk(VLLM, {"index": 1, "delta": {"content": "Hi"}, "logprobs": {"content": [_lp("Hi", -0.7)]}}),
        _chunk(
            VLLM,
            {
                "index": 1,
                "delta": {"content": "!"},
                "logprobs": {"content": [_lp("!", -1.5)]},
                "finish_reason": "length",
                "stop_reason": None,
            },
        ),
        _chunk(
            VLLM,
            {
                "index": 0,
                "delta": {"content": "lo"},
                "logprobs": {"content": [_lp("lo", -0.2)]},
                "finish_reason": "stop",
                "stop_reason": "</s>",
            },
        ),
        _chunk(
            VLLM,
            usage={"prompt_tokens": 7, "total_tokens": 11, "completion_tokens": 4},
            system_fingerprint="fp-1",
        ),
    ]
    assert assemble("chat", events) == {
        "id": "chatcmpl-7",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello"},
                "logprobs": {"content": [_lp("Hel", -0.1), _lp("lo", -0.2)]},
                "finish_reason": "stop",
                "stop_reason": "</s>",
            },
            {
                "index": 1,
                "message": {"role": "assistant", "content": "Hi!"},
                "logprobs": {"content": [_lp("Hi", -0.7), _lp("!", -1.5)]},
                "finish_reason": "length",
                "stop_reason": None,
            },
        ],
        "usage": {"prompt_tokens": 7, "total_tokens": 11, "completion_tokens": 4},
        "system_fingerprint": "fp-1",
    }


def test_vllm_tool_calls_are_assembled_by_index_with_their_arguments_concatenated() -> None:
    def tool_delta(**call: Any) -> dict[str, Any]:
        return _chunk(VLLM, {"index": 0, "delta": {"tool_calls": [call]}, "logprobs": None, "finish_reason": None})

    events = [
        _chunk(
            VLLM, {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        ),
        tool_delta(id="chatcmpl-tool-a", type="function", index=0, function={"name": "get_weather"}),
        tool_delta(index=0, function={"arguments": '{"city": '}),
        tool_delta(index=0, function={"arguments": '"Paris"}'}),
        tool_delta(id="chatcmpl-tool-b", type="function", index=1, function={"name": "get_time", "arguments": ""}),
        tool_delta(index=1, function={"arguments": "{}"}),
        _chunk(VLLM, {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls", "stop_reason": None}),
        _chunk(VLLM, usage={"prompt_tokens": 30, "total_tokens": 42, "completion_tokens": 12}),
    ]
    answer = assemble("chat", events)
    assert answer["choices"] == [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "chatcmpl-tool-a",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {"id": "chatcmpl-tool-b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
            "stop_reason": None,
        }
    ]


def test_vllm_reasoning_is_concatenated_beside_the_content() -> None:
    events = [
        _chunk(VLLM, {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}),
        _chunk(VLLM, {"index": 0, "delta": {"reasoning": "Let me "}, "finish_reason": None}),
        _chunk(VLLM, {"index": 0, "delta": {"reasoning": "think."}, "finish_reason": None}),
        _chunk(VLLM, {"index": 0, "delta": {"content": "42"}, "finish_reason": "stop", "stop_reason": None}),
    ]
    message = assemble("chat", events)["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "42", "reasoning": "Let me think."}


def test_sglang_chat_with_reasoning_content_and_matched_stop() -> None:
    # build_sse_content: the delta omits its None fields, the choice keeps logprobs/finish_reason/matched_stop;
    # every choice's finish chunk comes after the last token; the usage chunk is a full model_dump_json
    def choice(delta: dict[str, Any], finish: str | None = None, matched: int | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, "matched_stop": matched}

    usage = {"prompt_tokens": 5, "total_tokens": 9, "completion_tokens": 4, "prompt_tokens_details": None}
    events = [
        _chunk(SGLANG, choice({"role": "assistant", "content": ""})),
        _chunk(SGLANG, choice({"reasoning_content": "hmm"})),
        _chunk(SGLANG, choice({"content": "Hi"})),
        _chunk(SGLANG, choice({"content": " there"})),
        _chunk(SGLANG, choice({}, "stop", 1)),
        _chunk(SGLANG, usage=usage),
    ]
    assert assemble("chat", events) == {
        "id": "9f2c",
        "object": "chat.completion",
        "created": 1700000001,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi there", "reasoning_content": "hmm"},
                "logprobs": None,
                "finish_reason": "stop",
                "matched_stop": 1,
            }
        ],
        "usage": usage,
    }


def test_completions_n2_logprobs_lists_are_concatenated() -> None:
    def piece(index: int, text: str, offset: int, finish: str | None = None) -> dict[str, Any]:
        logprobs = {"text_offset": [offset], "token_logprobs": [-0.5], "tokens": [text], "top_logprobs": [{text: -0.5}]}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish, "stop_reason": None}

    events = [
        _chunk(VLLM_CMPL, piece(0, "a", 0)),
        _chunk(VLLM_CMPL, piece(1, "x", 0)),
        _chunk(VLLM_CMPL, piece(0, "b", 1, "length")),
        _chunk(VLLM_CMPL, piece(1, "y", 1, "length")),
        _chunk(VLLM_CMPL, usage={"prompt_tokens": 3, "total_tokens": 7, "completion_tokens": 4}),
    ]
    answer = assemble("completions", events)
    assert answer["object"] == "text_completion"
    assert [c["text"] for c in answer["choices"]] == ["ab", "xy"]
    assert answer["choices"][0]["logprobs"] == {
        "text_offset": [0, 1],
        "token_logprobs": [-0.5, -0.5],
        "tokens": ["a", "b"],
        "top_logprobs": [{"a": -0.5}, {"b": -0.5}],
    }
    assert [c["finish_reason"] for c in answer["choices"]] == ["length", "length"]
    assert answer["usage"]["prompt_tokens"] == 3


@pytest.mark.parametrize(
    "error",
    [
        {"error": {"message": "boom", "type": "InternalServerError", "param": None, "code": 500}},
        {"object": "error", "message": "boom", "type": "InternalServerError", "param": None, "code": 500},
    ],
)
def test_an_error_event_is_kept_as_the_engines_error(error: dict[str, Any]) -> None:
    assembler = CompletionAssembler("chat")
    assembler.add(_chunk(VLLM, {"index": 0, "delta": {"content": "a"}}))
    assembler.add(error)
    assert assembler.error == error


def test_continuous_usage_is_the_fallback_when_no_usage_only_chunk_came() -> None:
    events = [
        _chunk(VLLM, {"index": 0, "delta": {"content": "a"}}, usage={"prompt_tokens": 4, "completion_tokens": 1}),
        _chunk(VLLM, {"index": 0, "delta": {"content": "b"}, "finish_reason": "stop"}, usage={"prompt_tokens": 4}),
    ]
    assert assemble("chat", events)["usage"] == {"prompt_tokens": 4}
    assert reported_prompt_tokens({"prompt_tokens": 4}) == 4
    assert reported_prompt_tokens({"prompt_tokens": True}) is None and reported_prompt_tokens(None) is None


def test_sse_events_split_whatever_the_chunk_boundaries() -> None:
    stream = b'data: {"a": 1}\n\ndata: {"b":\r\n\r\n: comment\n\ndata: [DONE]\n\n'
    for cut in range(1, len(stream)):
        splitter = SSEEvents()
        events = splitter.feed(stream[:cut]) + splitter.feed(stream[cut:])
        assert [event_data(e) for e in events] == ['{"a": 1}', '{"b":', None, "[DONE]"]
        assert splitter.rest() == b""


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


STREAM = [
    _sse(_chunk(VLLM, {"index": 0, "delta": {"content": "usage"}, "finish_reason": None})),
    _sse(_chunk(VLLM, {"index": 0, "delta": {}, "finish_reason": "stop"})),
    _sse(_chunk(VLLM, usage={"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14})),
    _sse("[DONE]"),
]


def test_stripping_drops_the_usage_chunk_and_leaves_every_other_byte() -> None:
    whole = b"".join(STREAM)
    for cut in range(1, len(whole)):
        usage = StreamUsage(strip=True)
        relayed = usage.feed(whole[:cut]) + usage.feed(whole[cut:]) + usage.rest()
        assert relayed == STREAM[0] + STREAM[1] + STREAM[3]
        assert usage.prompt_tokens == 12


def test_watching_relays_chunks_untouched_and_reads_the_prompt_tokens() -> None:
    usage = StreamUsage(strip=False)
    assert [usage.feed(c) for c in STREAM] == STREAM
    assert usage.rest() == b"" and usage.prompt_tokens == 12


def test_stripping_deletes_usage_an_engine_put_on_a_chunk_with_choices() -> None:
    chunk = _chunk(SGLANG, {"index": 0, "delta": {"content": "a"}}, usage={"prompt_tokens": 3})
    usage = StreamUsage(strip=True)
    relayed = usage.feed(_sse(chunk))
    assert json.loads(event_data(relayed) or "") == _chunk(SGLANG, {"index": 0, "delta": {"content": "a"}})
    assert usage.prompt_tokens == 3


def test_sglang_tool_calls_keep_their_index_as_its_non_streamed_answer_does() -> None:
    call = {"id": "call_1", "index": 0, "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    events = [
        _chunk(SGLANG, {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}),
        _chunk(SGLANG, {"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}),
        _chunk(SGLANG, {"index": 0, "delta": {}, "finish_reason": "tool_calls", "matched_stop": None}),
    ]
    sglang = assemble("chat", events, tool_call_index=True)["choices"][0]["message"]["tool_calls"]
    assert sglang == [call]
    vllm = assemble("chat", events)["choices"][0]["message"]["tool_calls"]
    assert vllm == [{k: v for k, v in call.items() if k != "index"}]


@pytest.mark.parametrize(
    ("chunk", "status"),
    [
        (b'data: {"object": "error", "message": "Decode transfer failed", "code": 500}\n\n', 500),  # SGLang
        (b'data: {"error": {"message": "Internal server error", "code": 500}}\n\ndata: [DONE]\n\n', 500),  # vLLM
        (b'data: {"error": {"message": "bad", "code": 400}}\n\n', 400),
        (b'data: {"error": {"message": "no code"}}\n\n', 502),
    ],
)
def test_a_stream_that_opens_with_an_error_event_is_recognised(chunk, status):
    found = leading_error(chunk)
    assert found is not None and error_event_status(found[0]) == status
    assert json.loads(found[1]) == found[0]


@pytest.mark.parametrize(
    "chunk",
    [
        b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n',
        b'data: {"choices": [], "error": {"code": 500}}\n\n',  # carries choices: not an error event
        b": keep-alive\n\n",
        b'data: {"object": "error"',  # the event is not whole yet
        b"data: not json\n\n",
    ],
)
def test_a_stream_that_opens_otherwise_is_not_an_error(chunk):
    assert leading_error(chunk) is None
