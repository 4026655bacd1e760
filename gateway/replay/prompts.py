"""Replay prompts whose length under DeepSeek-V3's tokenizer is exactly the trace's prompt tokens.

The engine counts a request's prompt with the model's tokenizer, after the chat template for a chat request;
the gateway only estimates it (:mod:`gateway.tokens`). :class:`TokenizerPrompts` makes prompts of real English
prose (``gateway/data/text/prose_en.md``) whose true count is the trace's, so the gateway's estimate of them is
off as it is on real traffic, not exact.

How the count is made exact without encoding each prompt: DeepSeek-V3's tokenizer first splits text into
pre-tokens (a regex split) and runs BPE inside each, so a text's count is the sum of its pre-tokens' counts.
The prose is split once; it is cut only before a pre-token that is a space and a word (`` word``), which a cut
leaves intact, and topped up with `` a`` pre-tokens (one token each). A prompt is a request-unique tag (so no two
prompts share a prefix an engine could cache), then the prose from its start, repeated if needed, then the
top-up. Preparing the prose takes a few tenths of a second once; a prompt then costs a string slice.

Prompts with block ids (Mooncake's ``hash_ids``, one per 512 tokens): the prompt is the concatenation of one text per
block, each a function of the block id alone (:meth:`TokenizerPrompts.block_text`: a tag spelling the id, then the
prose), so two requests whose leading ids are equal send the same leading text, token for token; a block's text
starts with a space and a word and ends at a cut or a ``PAD``, so the concatenation counts the sum of its blocks.
"""

from __future__ import annotations

import bisect
import functools
import importlib.resources
import re
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.types import PREFIX_BLOCK_TOKENS
from gateway.workload.tokenizer import DeepSeekTokenizer, deepseek_tokenizer

PAD = " a"
"""One token under DeepSeek-V3's tokenizer, and a pre-token of its own after any cut."""
_WORD_PIECE = re.compile(r" [A-Za-z]+")
CHAT_TEMPLATE_TOKENS = 3
"""Tokens DeepSeek-V3's chat template adds around one user message: BOS, ``<｜User｜>``, ``<｜Assistant｜>``."""


@dataclass(frozen=True)
class _Filler:
    text: str
    """The prose from its first cut to its last, so that copies join at a cut."""
    offsets: list[int]
    """Character offsets of the cuts in ``text``, increasing, from 0."""
    tokens: list[int]
    """Tokens of ``text[:offsets[i]]``, increasing, from 0."""

    @property
    def total(self) -> int:
        return self.tokens[-1]

    def take(self, n: int) -> str:
        """Text of exactly ``n`` tokens: whole copies, the longest cut prefix that fits, then ``PAD``s."""
        copies, rest = divmod(n, self.total)
        i = bisect.bisect_right(self.tokens, rest) - 1
        return self.text * copies + self.text[: self.offsets[i]] + PAD * (rest - self.tokens[i])


def _prepare(tokenizer: DeepSeekTokenizer, prose: str) -> _Filler:
    """Split ``prose`` into pre-tokens once and record its cuts with their token counts."""
    pieces = tokenizer.pre_tokens(prose)
    counts = tokenizer.count_texts([prose[a:b] for a, b in pieces])
    cuts = {k for k, (a, b) in enumerate(pieces) if _WORD_PIECE.fullmatch(prose[a:b])}
    first, last = min(cuts), max(cuts)
    start = pieces[first][0]
    offsets, tokens, total = [0], [0], 0
    for k in range(first, last):
        total += counts[k]
        if k + 1 in cuts:
            offsets.append(pieces[k + 1][0] - start)
            tokens.append(total)
    return _Filler(prose[start : pieces[last][0]], offsets, tokens)


class TokenizerPrompts:
    """Prompts of exactly a given number of tokens as DeepSeek-V3's engine counts them.

    Build one with :func:`tokenizer_prompts` (cached: the prose is prepared once per process).
    """

    def __init__(self, tokenizer: DeepSeekTokenizer, prose: str) -> None:
        self._tokenizer = tokenizer
        self._filler = _prepare(tokenizer, prose)

    def text(self, index: int, n_tokens: int) -> str:
        """A text of exactly ``n_tokens`` tokens (``>= 0``; no special tokens added) starting with a tag unique
        to ``index`` when it fits (plain top-up below)."""
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        tag = f"request {index:x}"
        tag_tokens = self._tokenizer.count_text(tag)
        if n_tokens < tag_tokens:
            return PAD * n_tokens
        return tag + self._filler.take(n_tokens - tag_tokens)

    def _tagged(self, tag: str, n_tokens: int) -> str:
        tag_tokens = self._tokenizer.count_text(tag)
        return PAD * n_tokens if n_tokens < tag_tokens else tag + self._filler.take(n_tokens - tag_tokens)

    def block_text(self, block_id: int, n_tokens: int) -> str:
        """The text of block ``block_id``, ``n_tokens`` tokens long (``PREFIX_BLOCK_TOKENS`` for a whole block)."""
        return self._tagged(" Block" + _letters(block_id), n_tokens)

    def blocks_text(self, index: int, block_ids: Sequence[int], n_tokens: int) -> str:
        """A text of exactly ``n_tokens`` tokens made of the blocks ``block_ids`` (512 tokens each, the last ones
        shortened to fit), then, past the last block, a tail unique to request ``index``."""
        parts, left = [], n_tokens
        for block_id in block_ids:
            if left == 0:
                break
            take = min(PREFIX_BLOCK_TOKENS, left)
            parts.append(self.block_text(block_id, take))
            left -= take
        if left:
            parts.append(self._tagged(" Request" + _letters(index), left))
        return "".join(parts)

    def chat_content(self, index: int, prompt_tokens: int) -> str:
        """The one user message whose chat request counts ``prompt_tokens`` tokens after the chat template (the
        template's own :data:`CHAT_TEMPLATE_TOKENS` included; an empty message below that)."""
        return self.text(index, max(0, prompt_tokens - CHAT_TEMPLATE_TOKENS))

    def chat_content_blocks(self, index: int, block_ids: Sequence[int], prompt_tokens: int) -> str:
        """The one user message of :meth:`chat_content` made of blocks (:meth:`blocks_text`); the chat template's
        tokens come off the end, so every block but the last ones keeps its 512 tokens."""
        return self.blocks_text(index, block_ids, max(0, prompt_tokens - CHAT_TEMPLATE_TOKENS))


def _letters(n: int) -> str:
    """``n`` (>= 0) spelled in lower-case letters, base 26, so that a tag is a single word."""
    out = ""
    while True:
        n, digit = divmod(n, 26)
        out = chr(ord("a") + digit) + out
        if n == 0:
            return out


@functools.cache
def tokenizer_prompts() -> TokenizerPrompts:
    """The :class:`TokenizerPrompts` over ``gateway/data/text/prose_en.md`` and DeepSeek-V3's tokenizer."""
    prose = (importlib.resources.files("gateway") / "data" / "text" / "prose_en.md").read_text(encoding="utf-8")
    return TokenizerPrompts(deepseek_tokenizer(), prose)
