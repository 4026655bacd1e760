"""What the gateway reads from an OpenAI request's prompt: its estimated tokens and its text.

The gateway must know roughly how many prompt tokens a request carries before it reaches an engine, to
balance prefill work across DP ranks. :class:`PromptCounter` is what the front door asks, per model: with a
model's ``tokenizer`` configured (``models.<name>.tokenizer``) it counts with the model's own tokenizer and chat
template (:class:`gateway.tokenizer_file.ModelTokenizer`); without one, with a heuristic. Either way the count is
scaled by a per-model correction learnt online from the prompt tokens the engines report
(:class:`PromptTokenCorrection`). What each costs per request: ``bench/results/token_count_cost.md``.

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

import math
from collections import OrderedDict
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


class BodyCounter(Protocol):
    """Counts the prompt tokens of a whole OpenAI request body, chat template included
    (:class:`gateway.tokenizer_file.ModelTokenizer`)."""

    def count_body(self, body: Mapping[str, Any]) -> int:
        """Prompt tokens of ``body`` (>= 0)."""
        ...


CORRECTION_WEIGHT = 0.05
"""Weight of one observation of :data:`CORRECTION_REFERENCE_TOKENS` or more prompt tokens in the correction's
exponentially weighted mean: the log ratio's half-life is about 14 such observations (ln 2 / 0.05), short enough
to follow a change of traffic within a minute at a few requests a second, long enough that a few odd prompts do
not swing it. A design choice, not a measurement."""

CORRECTION_REFERENCE_TOKENS = 1024
"""Prompt size (tokens, as estimated) from which an observation counts in full; a smaller one counts in
proportion. Small prompts carry a relatively large template overhead and rounding (a two-word message is 1
estimated token and about 8 real ones after DeepSeek-V3's template), and weigh little in prefill work; 1,024 is
about the median prompt of the Azure conversation trace (``bench/results/token_estimate_error.md``)."""

CORRECTION_MAX_LOG_RATIO = math.log(4.0)
"""Clamp, in natural log: one observation's log ratio reported/estimated is clipped to +-ln 4 before it enters
the mean, so one outlier moves the factor by at most ``CORRECTION_WEIGHT * ln 4`` (7%); the factor itself stays
within [1/4, 4]. The widest systematic error measured is Chinese text, 2.35x under the four-characters
heuristic (``bench/results/token_estimate_error.md``), inside the bound."""


class PromptTokenCorrection:
    """A per-model correction of the prompt-token estimate, learnt online from the engines' reports.

    The factor is ``exp(m)``, where ``m`` is an exponentially weighted mean of ``x = clamp(log(reported /
    estimated))`` over the requests the engines reported on, ``estimated`` being the raw (uncorrected) count:
    ``m += w * (x - m)`` with ``w = CORRECTION_WEIGHT * min(1, estimated / CORRECTION_REFERENCE_TOKENS)``; clamps
    :data:`CORRECTION_MAX_LOG_RATIO`. A mean of raw ratios, not an integral of the corrected estimates' residuals:
    reports arrive only as requests finish, after many more were sent with an older factor, and a residual fed
    back that late winds up (measured in the simulator: with hundreds of requests in flight the factor ran to its
    clamp, 4, where the truth was 2.35).

    It also keeps the exponentially weighted mean of ``|log(reported / (estimated * factor))|``, the typical
    relative error of the corrected estimate at the time of the report (exported as a metric).
    """

    def __init__(self) -> None:
        self.log_factor = 0.0
        self.abs_log_error = 0.0
        self.observations = 0

    @property
    def factor(self) -> float:
        """The multiplier applied to new estimates (1.0 before any observation; within [1/4, 4])."""
        return math.exp(self.log_factor)

    def correct(self, raw: int) -> int:
        """``raw`` scaled by :attr:`factor`, rounded (0 stays 0, anything else is at least 1)."""
        if raw <= 0:
            return 0
        return max(1, round(raw * self.factor))

    def observe(self, estimated: int, reported: int) -> None:
        """The engine reported ``reported`` prompt tokens for a request whose raw (uncorrected) count was
        ``estimated``. Observations with a count <= 0 on either side are ignored."""
        if estimated <= 0 or reported <= 0:
            return
        x = max(-CORRECTION_MAX_LOG_RATIO, min(CORRECTION_MAX_LOG_RATIO, math.log(reported / estimated)))
        w = CORRECTION_WEIGHT * min(1.0, estimated / CORRECTION_REFERENCE_TOKENS)
        self.abs_log_error += w * (abs(x - self.log_factor) - self.abs_log_error)
        self.log_factor += w * (x - self.log_factor)
        self.observations += 1


MAX_REMEMBERED_ESTIMATES = 65_536
"""Distinct estimates per model whose raw count the counter remembers, the least recently handed out forgotten
beyond it (reports that never come, e.g. of failed requests, must not grow memory)."""


class PromptCounter:
    """The front door's prompt-token count, per model: the model's own tokenizer where one is configured, else
    the heuristic; then the model's online correction.

    The scheduler gets the corrected count, and the engine's report comes back with it
    (:meth:`observe`); the counter remembers which raw count each corrected figure it handed out last stood for
    (:data:`MAX_REMEMBERED_ESTIMATES` of them per model), so the correction learns from raw counts
    (:class:`PromptTokenCorrection` says why). Two requests handed the same figure stood for raw counts that differ
    only by how much the factor moved between them.

    Args:
        tokenizers: model name → its tokenizer (chat template included).
        default: how models without one count text; the :class:`CharTokenizer` heuristic when ``None``.
        correct: scale counts by the online correction, for every model or per model (``False``: the count
            stays raw; the factor is still learnt and exported).
    """

    def __init__(
        self,
        tokenizers: Mapping[str, BodyCounter] | None = None,
        default: Tokenizer | None = None,
        *,
        correct: bool | Mapping[str, bool] = True,
    ) -> None:
        self._tokenizers = dict(tokenizers or {})
        self._default = default or CharTokenizer()
        self._correct = correct
        self._corrections: dict[str, PromptTokenCorrection] = {}
        self._raw: dict[str, OrderedDict[int, int | None]] = {}

    def correction(self, model: str) -> PromptTokenCorrection:
        """``model``'s correction (created at its first use)."""
        found = self._corrections.get(model)
        if found is None:
            found = self._corrections[model] = PromptTokenCorrection()
        return found

    def _corrects(self, model: str) -> bool:
        if isinstance(self._correct, bool):
            return self._correct
        return self._correct.get(model, True)

    def raw_count(self, model: str, body: Mapping[str, Any]) -> int:
        """The prompt tokens of ``body`` before the correction."""
        tokenizer = self._tokenizers.get(model)
        if tokenizer is not None:
            return tokenizer.count_body(body)
        return count_prompt_tokens(body, self._default)

    def count(self, model: str, body: Mapping[str, Any]) -> int:
        """The prompt tokens the scheduler should account for ``body`` sent to ``model``: the raw count scaled
        by the model's correction; a prompt of token ids is exact and never scaled."""
        raw = self.raw_count(model, body)
        exact = _is_ids_prompt(body)
        counted = raw if exact or not self._corrects(model) else self.correction(model).correct(raw)
        remembered = self._raw.setdefault(model, OrderedDict())
        remembered[counted] = None if exact else raw
        remembered.move_to_end(counted)
        if len(remembered) > MAX_REMEMBERED_ESTIMATES:
            remembered.popitem(last=False)
        self.correction(model)
        return counted

    def observe(self, model: str, estimated: int, reported: int) -> None:
        """The engine reported ``reported`` prompt tokens (``usage.prompt_tokens``) for a request to ``model``
        that the scheduler counted as ``estimated`` (:meth:`count`'s answer). A request counted exactly (token
        ids) teaches nothing; an estimate the counter no longer remembers is taken back through the current
        factor."""
        correction = self.correction(model)
        remembered = self._raw.get(model, OrderedDict())
        if estimated in remembered:
            raw = remembered[estimated]
            if raw is None:
                return
        elif self._corrects(model):
            raw = round(estimated / correction.factor)
        else:
            raw = estimated
        correction.observe(raw, reported)

    def corrections(self) -> dict[str, PromptTokenCorrection]:
        """Every model's correction so far (model name → correction), for the metrics."""
        return dict(self._corrections)


def _is_ids_prompt(body: Mapping[str, Any]) -> bool:
    prompt = body.get("prompt")
    return "messages" not in body and isinstance(prompt, list) and all(isinstance(p, int | list) for p in prompt)


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
