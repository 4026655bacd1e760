"""Prompt-token estimation at the gateway.

The gateway must know roughly how many prompt tokens a request carries before it reaches an engine, to
balance prefill work across DP ranks. Running the model's real tokenizer in the gateway is possible (plug one
in through :class:`Tokenizer`) but costs CPU on the hot path; the default is a heuristic.

Heuristic (``CharTokenizer``): one token per ``CHARS_PER_TOKEN`` = 4 characters of text, rounded up. This is
OpenAI's published rule of thumb for English text ("one token is roughly four characters",
help.openai.com "What are tokens and how to count them"). Pre-tokenized prompts (lists of token ids) are
counted exactly. Chat messages are the sum over their text content; non-text parts (images, audio) count as
``NON_TEXT_PART_TOKENS`` each, a rough placeholder.

The simulated engines use the same tokenizer, and the trace replay synthesises prompts with
:func:`synthesize_prompt`, whose estimate is exactly the requested count, so a trace's token counts survive
the round trip.
"""

from __future__ import annotations

from collections.abc import Mapping
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


def synthesize_prompt(n_tokens: int) -> str:
    """Return a text whose :class:`CharTokenizer` estimate is exactly ``n_tokens`` (``n_tokens >= 0``)."""
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    return _SYNTH_WORD * n_tokens
