"""DeepSeek-V3's tokenizer as the engines' truth, and replay prompts of an exact true length."""

from __future__ import annotations

import random

import pytest

from gateway.replay.client import request_body
from gateway.replay.prompts import CHAT_TEMPLATE_TOKENS, tokenizer_prompts
from gateway.tokens import count_prompt_tokens
from gateway.workload.tokenizer import ASSISTANT, BOS, EOS, USER, deepseek_tokenizer, render_chat


@pytest.mark.parametrize(
    ("messages", "rendered"),
    [
        ([{"role": "user", "content": "Hi"}], f"{BOS}{USER}Hi{ASSISTANT}"),
        (
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "<think>hmm</think>Hello"},
                {"role": "user", "content": [{"type": "text", "text": "Again"}]},
            ],
            f"{BOS}Be brief.{USER}Hi{ASSISTANT}Hello{EOS}{USER}Again{ASSISTANT}",
        ),
        (
            [{"role": "system", "content": "A"}, {"role": "system", "content": "B"}, {"role": "user", "content": "x"}],
            f"{BOS}A\n\nB{USER}x{ASSISTANT}",
        ),
    ],
)
def test_chat_requests_render_as_deepseek_v3s_template(messages, rendered):
    assert render_chat(messages) == rendered


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("", 0),
        (BOS, 1),  # special tokens count as one
        (f"{BOS}{USER}{ASSISTANT}", 3),
        (" a" * 100, 100),
        ("Hello world", 2),
    ],
)
def test_counts(text, tokens):
    assert deepseek_tokenizer().count_text(text) == tokens


def test_a_chat_body_counts_its_template_tokens_and_a_prompt_body_does_not():
    tok = deepseek_tokenizer()
    text = "The scheduler places each request on a DP rank."
    assert tok.count_body({"messages": [{"role": "user", "content": text}]}) == tok.count_text(text) + 3
    assert tok.count_body({"prompt": text}) == tok.count_text(text)
    assert tok.count_body({"prompt": [1, 2, 3]}) == 3
    assert tok.count_texts([text, "", text]) == [tok.count_text(text), 0, tok.count_text(text)]


def test_chinese_takes_more_tokens_than_the_gateway_estimates():
    text = "鉴于对人类家庭所有成员的固有尊严及其平等的和不移的权利的承认,乃是世界自由、正义与和平的基础"
    assert deepseek_tokenizer().count_text(text) > 1.5 * count_prompt_tokens({"prompt": text})


SIZES = [0, 1, 2, 3, 4, 5, 9, 64, 1000, 4097, 17_011, 17_013, 40_000, 100_000]


@pytest.mark.parametrize("n", SIZES + random.Random(0).sample(range(6, 30_000), 40))
def test_replay_prompts_have_exactly_the_trace_count_under_the_tokenizer(n):
    tok, prompts = deepseek_tokenizer(), tokenizer_prompts()
    index = n * 7919 % 10_000_000
    assert tok.count_text(prompts.text(index, n)) == n
    if n >= CHAT_TEMPLATE_TOKENS:
        for endpoint in ("chat", "completions"):
            body = request_body(endpoint, "m", index, n, 1, prompts="tokenizer")
            assert tok.count_body(body) == n


def test_replay_prompts_differ_from_the_start_and_the_gateway_estimates_them_as_prose():
    prompts = tokenizer_prompts()
    a, b = prompts.text(1, 2000), prompts.text(2, 2000)
    assert a[:12] != b[:12]
    estimate = count_prompt_tokens({"prompt": a})
    assert estimate != 2000
    assert 0.95 < 2000 / estimate < 1.25  # bench/results/token_estimate_error.md: prose, p5-p95 0.97-1.21


def test_replay_prompts_by_estimate_stay_as_they_were():
    body = request_body("chat", "m", 7, 500, 1)
    assert count_prompt_tokens(body) == 500
    assert body == request_body("chat", "m", 7, 500, 1, prompts="estimate")
