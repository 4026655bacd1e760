"""What the gateway reads from an OpenAI request's prompt: its estimated tokens and its text.

The gateway must know roughly how many prompt tokens a request carries before it reaches an engine, to
balance prefill work across DP ranks. Running the model's real tokenizer in the gateway is possible (plug one
in through :class:`Tokenizer`) but costs CPU on the hot path; the default is a heuristic.

Heuristic (``CharTokenizer``): one token per ``CHARS_PER_TOKEN`` = 4 characters of text, rounded up. This is
OpenAI's published rule of thumb for English text ("one token is roughly four characters",
help.openai.com "What are tokens and how to count them"). Pre-tokenized prompts (lists of token ids) are
counted exactly. Chat messages are the sum over their text content; non-text parts (images, audio) count as
``NON_TEXT_PART_TOKENS`` each, a rough placeholder.

By default the simulated engines count with the same heuristic and the trace replay synthesises prompts with
:func:`synthesize_prompt`, whose estimate is exactly the requested count; ``gateway mock-engine --tokenizer
deepseek`` and ``gateway bench --prompts tokenizer`` count with DeepSeek-V3's own tokenizer instead
(:mod:`gateway.workload.tokenizer`), as a real engine does.

:func:`prompt_texts` gives the prompt's text in order, which the front door hashes into prefix blocks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

CHARS_PER_TOKEN = 4
"""Characters per token of the heuristic (OpenAI's rule of thumb for English)."""

NON_TEXT_PART_TOKENS = 256
"""Tokens counted for one non-text content part (image, audio): a placeholder, not a measurement."""

_SYNTH_WORD = "tok "  # exactly CHARS_PER_TOKEN characters


class Tokenizer(Protocol):
    """Counts tokens of a piece of text. Implement it to plug a real tokenizer into the gateway."""

    def count_text(self, text: str) -> int:
        """Return the number of tokens in ``text`` (>= 0)."""
        ...


class CharTokenizer:
    """The default heuristic tokenizer: ``ceil(len(text) / CHARS_PER_TOKEN)`` tokens."""

    def count_text(self, text: str) -> int:
        return -(-len(text) // CHARS_PER_TOKEN)


def _count_content(content: Any, tokenizer: Tokenizer) -> int:
    if isinstance(content, str):
        return tokenizer.count_text(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                total += tokenizer.count_text(part["text"])
            elif isinstance(part, Mapping):
                total += NON_TEXT_PART_TOKENS
        return total
    return 0


def count_prompt_tokens(body: Mapping[str, Any], tokenizer: Tokenizer | None = None) -> int:
    """Estimate the prompt tokens of an OpenAI request body.

    Args:
        body: a ``/v1/chat/completions`` body (``messages``) or a ``/v1/completions`` body (``prompt``: a
            string, a list of strings, a list of token ids, or a list of lists of token ids).
        tokenizer: the tokenizer to use; the :class:`CharTokenizer` heuristic when ``None``.

    Returns:
        The estimated number of prompt tokens (>= 0). Shapes it does not understand count as 0; validating
        the body is the front door's job, not this function's.
    """
    tok = tokenizer or CharTokenizer()
    messages = body.get("messages")
    if isinstance(messages, list):
        return sum(_count_content(m.get("content"), tok) for m in messages if isinstance(m, Mapping))
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return tok.count_text(prompt)
    if isinstance(prompt, list):
        if all(isinstance(p, int) for p in prompt):
            return len(prompt)
        total = 0
        for p in prompt:
            if isinstance(p, str):
                total += tok.count_text(p)
            elif isinstance(p, list):
                total += len(p)
        return total
    return 0


def prompt_texts(body: Mapping[str, object]) -> Iterator[str]:
    """The prompt's text of an OpenAI request body in order, for its prefix block hashes
    (:func:`gateway.types.prefix_block_hashes`): each message's role and text parts, or the ``prompt`` strings
    (token-id prompts as their decimal ids). Shapes it does not understand give nothing."""
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, Mapping):
                continue
            yield str(message.get("role", ""))
            content = message.get("content")
            if isinstance(content, str):
                yield content
            elif isinstance(content, list):
                yield from (p["text"] for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str))
        return
    prompt = body.get("prompt")
    parts = [prompt] if isinstance(prompt, str) or _is_ids(prompt) else prompt if isinstance(prompt, list) else []
    for part in parts:
        if isinstance(part, str):
            yield part
        elif isinstance(part, list) and _is_ids(part):
            yield " ".join(map(str, part))


def _is_ids(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) for v in value)


def synthesize_prompt(n_tokens: int) -> str:
    """Return a text whose :class:`CharTokenizer` estimate is exactly ``n_tokens`` (``n_tokens >= 0``)."""
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    return _SYNTH_WORD * n_tokens
