"""A served model's own tokenizer, read from its Hugging Face ``tokenizer.json``, and its chat template.

The engine counts a chat request's prompt tokens after rendering the model's chat template: role markers, the
BOS token, separators and the generation prompt are tokens too. :class:`ModelTokenizer` counts the same way:

- ``tokenizer.json`` (the Hugging Face ``tokenizers`` format) is read with the ``tokenizers`` library.
- The chat template comes from next to it: ``chat_template.jinja`` if present (where ``transformers`` >= 4.43
  saves it), else ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named templates of which
  ``default`` is taken), with the special tokens (``bos_token``, ``eos_token``, ...) that file names. It is
  rendered with Jinja2 the way ``transformers``' ``apply_chat_template`` renders it (an immutable sandbox,
  ``trim_blocks``, ``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception``, ``strftime_now`` and a
  ``tojson`` that keeps non-ASCII characters; ``transformers/utils/chat_template_utils.py``,
  ``_compile_jinja_template``), with ``add_generation_prompt=True`` and the request's ``tools``.
- A message whose ``content`` is a list of parts is rendered with its text parts joined by a newline, as vLLM
  renders a text-only template ("string" content format, ``vllm/entrypoints/chat_utils.py``); each non-text part
  counts as :data:`gateway.tokens.NON_TEXT_PART_TOKENS` on top.
- The rendered prompt is encoded without adding special tokens (the template wrote them), as vLLM's and
  SGLang's chat endpoints encode it; a completions ``prompt`` is encoded with them, as their completions
  endpoints do.

Without a template the count is the content's tokens alone. Why render the template rather than add a fixed
per-message overhead: ``bench/results/token_count_cost.md``.

A long text is not tokenised whole: DeepSeek-V3's pre-tokenizer regexes make a 32k-token chat cost tens of
milliseconds, which would stall the event loop that relays every stream. Above ``max_chars`` characters
:meth:`ModelTokenizer.count_text` tokenises ``max_chars // SAMPLE_WINDOW_CHARS`` evenly spaced windows of
:data:`SAMPLE_WINDOW_CHARS` characters (the first at the start) and scales their tokens by the text's length over
theirs; the error this leaves is measured in ``bench/results/token_count_cost.md``, and what remains of it on
average is learnt by the online correction (:class:`gateway.tokens.PromptTokenCorrection`).
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer

from gateway.config import ConfigError, ModelConfig
from gateway.tokens import NON_TEXT_PART_TOKENS, PromptCounter, Tokenizer

log = logging.getLogger(__name__)

DEFAULT_MAX_CHARS = 16_384
"""Longest text tokenised whole, characters; longer ones are sampled (module docstring). Chosen from
``bench/results/token_count_cost.md``: a few milliseconds a request, 2.5% mean error on long mixed-language
chats."""

SAMPLE_WINDOW_CHARS = 512
"""Characters of one window of a long text's sample; the sample is ``max_chars // SAMPLE_WINDOW_CHARS`` windows
spread evenly over the text, so that it follows changes of language, or from prose to code, along a long
conversation (a few large windows miss them: ``bench/results/token_count_cost.md``)."""


class TokenizerFileError(ValueError):
    """A tokenizer file or its chat template cannot be read; the message names the file."""


def _special_token(value: Any) -> str | None:
    """A special token of ``tokenizer_config.json``: a string, or an ``AddedToken`` object with ``content``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _read_template(folder: Path) -> tuple[str | None, dict[str, str]]:
    """The chat template and the special tokens found next to a ``tokenizer.json``.

    Raises:
        TokenizerFileError: ``tokenizer_config.json`` or ``chat_template.jinja`` exists but cannot be read.
    """
    config_path = folder / "tokenizer_config.json"
    config: dict[str, Any] = {}
    if config_path.is_file():
        try:
            loaded = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TokenizerFileError(f"cannot read {config_path}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise TokenizerFileError(f"cannot read {config_path}: not a JSON object")
        config = loaded
    specials = {
        key: token
        for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
        if (token := _special_token(config.get(key))) is not None
    }
    jinja_path = folder / "chat_template.jinja"
    if jinja_path.is_file():
        try:
            return jinja_path.read_text(encoding="utf-8"), specials
        except OSError as exc:
            raise TokenizerFileError(f"cannot read {jinja_path}: {exc}") from exc
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return (template if isinstance(template, str) else None), specials


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=False)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the environment ``transformers`` renders it in (see the module docstring).

    Raises:
        jinja2.TemplateError: the template does not compile.
    """
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _message_text(content: Any) -> tuple[Any, int]:
    """A message's content as the template gets it (text parts joined by a newline; ``None`` and strings kept)
    and the count of its non-text parts."""
    if not isinstance(content, list):
        return content, 0
    texts = [p["text"] for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str)]
    others = sum(1 for p in content if isinstance(p, Mapping) and not isinstance(p.get("text"), str))
    return "\n".join(texts), others


class ModelTokenizer:
    """One model's tokenizer and chat template; satisfies :class:`gateway.tokens.Tokenizer` (``count_text``) and
    counts whole request bodies (:meth:`count_body`).

    Build it with :meth:`from_file`.

    Args:
        tokenizer: the loaded ``tokenizers`` tokenizer.
        template: the compiled chat template, or ``None`` (then a chat counts its contents only).
        specials: the special tokens the template may use (``bos_token``, ``eos_token``, ...).
        max_chars: texts longer than this many characters are counted from a sample (module docstring);
            ``None`` tokenises every text whole.
    """

    def __init__(
        self,
        tokenizer: HFTokenizer,
        template: jinja2.Template | None = None,
        specials: Mapping[str, str] = {},
        max_chars: int | None = DEFAULT_MAX_CHARS,
    ) -> None:
        if max_chars is not None and max_chars < SAMPLE_WINDOW_CHARS:
            raise ValueError(f"max_chars must be at least {SAMPLE_WINDOW_CHARS}, got {max_chars}")
        self._tokenizer = tokenizer
        self.template = template
        self._specials = dict(specials)
        self.max_chars = max_chars

    @classmethod
    def from_file(
        cls, path: str | Path, *, chat_template: bool = True, max_chars: int | None = DEFAULT_MAX_CHARS
    ) -> ModelTokenizer:
        """Load ``path`` (a ``tokenizer.json``) and, with ``chat_template``, the template next to it; ``max_chars``
        as for the class.

        Raises:
            TokenizerFileError: the file is missing or not a tokenizer, or the template does not compile (the
                message names the file).
        """
        path = Path(path)
        if not path.is_file():
            raise TokenizerFileError(f"tokenizer file not found: {path}")
        try:
            tokenizer = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises a bare Exception for any malformed file
            raise TokenizerFileError(f"cannot read tokenizer {path}: {exc}") from exc
        if not chat_template:
            return cls(tokenizer, max_chars=max_chars)
        source, specials = _read_template(path.parent)
        if source is None:
            return cls(tokenizer, None, specials, max_chars)
        try:
            return cls(tokenizer, compile_chat_template(source), specials, max_chars)
        except jinja2.TemplateError as exc:
            raise TokenizerFileError(f"cannot compile the chat template next to {path}: {exc}") from exc

    def count_text(self, text: str) -> int:
        """Tokens of ``text``, special-token strings recognised, none added (>= 0); estimated from a sample above
        ``max_chars`` characters."""
        return self._count(text, add_special_tokens=False)

    def _count(self, text: str, *, add_special_tokens: bool) -> int:
        encode = self._tokenizer.encode
        if self.max_chars is None or len(text) <= self.max_chars:
            return len(encode(text, add_special_tokens=add_special_tokens))
        windows = self.max_chars // SAMPLE_WINDOW_CHARS
        stride = (len(text) - SAMPLE_WINDOW_CHARS) / max(1, windows - 1)
        pieces = [text[round(i * stride) :][:SAMPLE_WINDOW_CHARS] for i in range(windows)]
        sampled = sum(len(e) for e in self._tokenizer.encode_batch_fast(pieces, add_special_tokens=False))
        extra = len(encode("", add_special_tokens=True)) if add_special_tokens else 0
        return round(sampled * len(text) / (SAMPLE_WINDOW_CHARS * windows)) + extra

    def render_chat(self, messages: Sequence[Mapping[str, Any]], tools: Any = None) -> str:
        """The prompt the chat template makes of ``messages`` (with the generation prompt).

        Raises:
            ValueError: there is no template.
            jinja2.TemplateError, TypeError, ...: the template refuses the messages (as the engine would).
        """
        if self.template is None:
            raise ValueError("this tokenizer has no chat template")
        rendered = [{**m, "content": _message_text(m.get("content"))[0]} for m in messages]
        return self.template.render(messages=rendered, tools=tools, add_generation_prompt=True, **self._specials)

    def count_chat(self, messages: Sequence[Mapping[str, Any]], tools: Any = None) -> int:
        """Prompt tokens of a chat request: its rendered template's tokens plus the non-text parts' placeholder.

        When the template refuses the messages (the engine would answer 400), the contents' tokens alone.
        """
        non_text = sum(_message_text(m.get("content"))[1] for m in messages) * NON_TEXT_PART_TOKENS
        if self.template is not None:
            try:
                return self.count_text(self.render_chat(messages, tools)) + non_text
            except Exception as exc:  # a template may raise anything on input it does not expect
                log.debug("chat template refused a request (%s); counting its contents only", exc)
        texts = [t for m in messages if isinstance(t := _message_text(m.get("content"))[0], str)]
        return sum(self.count_text(t) for t in texts) + non_text

    def count_prompt(self, prompt: str) -> int:
        """Tokens of a completions ``prompt`` string, with the special tokens the tokenizer adds (BOS, if any)."""
        return self._count(prompt, add_special_tokens=True)

    def count_body(self, body: Mapping[str, Any]) -> int:
        """Prompt tokens of an OpenAI request body: ``messages`` rendered with the chat template, or ``prompt``
        (a string, a list of strings, token ids, or lists of token ids). Shapes it does not understand count 0."""
        messages = body.get("messages")
        if isinstance(messages, list):
            return self.count_chat([m for m in messages if isinstance(m, Mapping)], body.get("tools"))
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return self.count_prompt(prompt)
        if isinstance(prompt, list):
            if all(isinstance(p, int) for p in prompt):
                return len(prompt)
            return sum(
                self.count_prompt(p) if isinstance(p, str) else len(p) for p in prompt if isinstance(p, str | list)
            )
        return 0


def build_prompt_counter(models: Mapping[str, ModelConfig], default: Tokenizer | None = None) -> PromptCounter:
    """The front door's :class:`~gateway.tokens.PromptCounter` for the ``models`` settings: each model's
    ``tokenizer`` loaded (with its chat template unless ``chat_template`` is off), ``default`` for the others.

    Raises:
        ConfigError: a tokenizer file cannot be read or its template does not compile (the message names the
            field ``models.<name>.tokenizer`` and the file).
    """
    tokenizers: dict[str, ModelTokenizer] = {}
    for name, config in models.items():
        if config.tokenizer is None:
            continue
        try:
            tokenizers[name] = ModelTokenizer.from_file(
                config.tokenizer, chat_template=config.chat_template, max_chars=config.max_tokenized_chars
            )
        except TokenizerFileError as exc:
            raise ConfigError(f"invalid configuration: models.{name}.tokenizer: {exc}") from exc
    correct = {name: config.online_correction for name, config in models.items()}
    return PromptCounter(tokenizers, default, correct=correct)
