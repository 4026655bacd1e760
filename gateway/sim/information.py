"""What a real gateway knows about a request, and when: the simulator's information limits.

A live gateway estimates a prompt's tokens (:mod:`gateway.tokens`) while the engine counts them with the model's
tokenizer; it sees no first token of a non-streamed request, only its finish; and requests and tokens take time
to cross the network between gateway and engine. :class:`InformationLimits` describes these limits (all off by
default, which is the simulator's idealised gateway), and :func:`draw_request_views` draws, per request and
deterministically from a seed, what the gateway sees of it.

The trace's prompt length is the truth (what the engine processes); the gateway's
:class:`~gateway.types.PendingRequest` carries the estimate ``round(true / ratio)`` with ``ratio = true /
estimate`` drawn from a lognormal fitted to measurements (:data:`MEASURED_ESTIMATE_ERRORS`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenEstimateError:
    """The ratio true / estimated prompt tokens as a lognormal: ``log(ratio) ~ N(mu, sigma)``.

    Attributes:
        mu: mean of the log ratio (> 0: the gateway underestimates).
        sigma: standard deviation of the log ratio, >= 0.
    """

    mu: float
    sigma: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mu) and math.isfinite(self.sigma) and self.sigma >= 0):
            raise ValueError(f"need a finite mu and sigma >= 0, got mu={self.mu}, sigma={self.sigma}")

    def estimate(self, true_tokens: int, rng: random.Random) -> int:
        """The gateway's estimate of a prompt of ``true_tokens`` tokens (>= 1)."""
        return max(1, round(true_tokens / math.exp(rng.gauss(self.mu, self.sigma))))


MEASURED_ESTIMATE_ERRORS: dict[str, TokenEstimateError] = {
    "prose": TokenEstimateError(0.057, 0.068),
    "code": TokenEstimateError(0.004, 0.095),
    "chat": TokenEstimateError(0.044, 0.058),
    "chinese": TokenEstimateError(0.854, 0.058),
    "multilingual": TokenEstimateError(0.271, 0.339),
}
"""The gateway's four-characters-a-token estimate against DeepSeek-V3's tokenizer, lognormal fit per kind of
text (``bench/token_estimate_error.py``; the table with percentiles and sources is
``bench/results/token_estimate_error.md``). ``chat`` counts chat requests after DeepSeek-V3's chat template, as
the engine does; ``multilingual`` mixes eight languages and is bimodal, so its lognormal fit is rough."""

MEASURED = "chat"
"""The kind ``measured`` stands for: the traces are chat traffic, counted by the engine after its chat
template."""


def measured_estimate_error(name: str) -> TokenEstimateError:
    """The measured error of kind ``name`` (``measured`` is :data:`MEASURED`).

    Raises:
        ValueError: unknown kind; the message lists the kinds.
    """
    key = MEASURED if name == "measured" else name
    if key not in MEASURED_ESTIMATE_ERRORS:
        raise ValueError(f"unknown estimate error {name!r}; one of {['measured', *MEASURED_ESTIMATE_ERRORS]}")
    return MEASURED_ESTIMATE_ERRORS[key]


def parse_estimate_error(spec: str) -> TokenEstimateError | None:
    """An estimate error from its command-line form: ``none`` (exact counts), a measured kind (see
    :func:`measured_estimate_error`), or ``MU,SIGMA`` of the lognormal (``0,0.3`` is unbiased with sigma 0.3).

    Raises:
        ValueError: neither form, or a sigma below 0.
    """
    if spec == "none":
        return None
    if "," in spec:
        mu, _, sigma = spec.partition(",")
        try:
            return TokenEstimateError(float(mu), float(sigma))
        except ValueError as exc:
            raise ValueError(f"estimate error {spec!r}: MU,SIGMA must be numbers with sigma >= 0") from exc
    return measured_estimate_error(spec)


@dataclass(frozen=True)
class InformationLimits:
    """What the simulated gateway does not know, or knows late. The defaults are the idealised gateway.

    Attributes:
        estimate_error: the gateway sees a prompt-token estimate drawn with this error instead of the trace's
            count (the engine still processes the trace's count); ``None`` gives the gateway the exact count.
        nonstream_share: fraction 0-1 of requests not streamed: the gateway gets no first token or token of
            theirs, only their finish (the load view then guesses their prefill time, as in the live gateway).
        dispatch_latency_s: one-way latency between gateway and engine, seconds: a request placed at ``t``
            joins its engine at ``t + dispatch_latency_s + jitter``, and the engine's tokens and finishes reach
            the gateway as long after they happen.
        dispatch_jitter_s: each request's extra delay in each direction, uniform in ``[0, dispatch_jitter_s]``,
            seconds (drawn once per request and direction, so a request's tokens keep their order).
        stream_upstream: the gateway streams from the engine even when the client asked for a whole answer and
            assembles that answer itself (the live gateway's ``upstream.stream_nonstreamed``), so it sees every
            request's first token and tokens whatever ``nonstream_share`` says; ``nonstream_share`` then only
            describes the clients.
        online_correction: the gateway scales each estimate by the online correction it learns from the engines'
            reported prompt tokens at each finish, as the live gateway does
            (:class:`gateway.tokens.PromptTokenCorrection`).

    The draws are seeded by the simulation's ``seed`` (:func:`draw_request_views`).
    """

    estimate_error: TokenEstimateError | None = None
    nonstream_share: float = 0.0
    dispatch_latency_s: float = 0.0
    dispatch_jitter_s: float = 0.0
    stream_upstream: bool = False
    online_correction: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.nonstream_share <= 1:
            raise ValueError(f"nonstream_share must be within [0, 1], got {self.nonstream_share}")
        if not (self.dispatch_latency_s >= 0 and self.dispatch_jitter_s >= 0):
            raise ValueError("dispatch_latency_s and dispatch_jitter_s must be >= 0")

    @property
    def delays(self) -> bool:
        """Whether requests and progress take time to cross between gateway and engine."""
        return self.dispatch_latency_s > 0 or self.dispatch_jitter_s > 0


@dataclass(frozen=True, slots=True)
class RequestView:
    """What the gateway sees of one request.

    Attributes:
        prompt_tokens: the gateway's prompt-token figure (the estimate, or the trace's count).
        stream: whether the gateway sees its first token and tokens: the client streams it, or the gateway
            streams from the engine anyway (:attr:`InformationLimits.stream_upstream`).
        to_engine_s: delay from placement to the engine, seconds.
        to_gateway_s: delay of its tokens and finish from the engine back to the gateway, seconds.
    """

    prompt_tokens: int
    stream: bool
    to_engine_s: float
    to_gateway_s: float


def draw_request_views(prompt_tokens: list[int], limits: InformationLimits, seed: int) -> list[RequestView]:
    """One :class:`RequestView` per request (in trace order), deterministic for ``seed``.

    Each limit draws from its own stream (seeded by name), so switching one on leaves the others' draws as
    they were.
    """
    estimates, streams = prompt_tokens, [True] * len(prompt_tokens)
    if limits.estimate_error is not None:
        rng = random.Random(f"{seed}:estimate")
        estimates = [limits.estimate_error.estimate(n, rng) for n in prompt_tokens]
    if limits.nonstream_share > 0:
        rng = random.Random(f"{seed}:stream")
        streams = [rng.random() >= limits.nonstream_share for _ in prompt_tokens]
        if limits.stream_upstream:
            streams = [True] * len(prompt_tokens)
    rng = random.Random(f"{seed}:dispatch")
    base, jitter = limits.dispatch_latency_s, limits.dispatch_jitter_s
    views = []
    for n, stream in zip(estimates, streams, strict=True):
        out = base + (rng.uniform(0, jitter) if jitter else 0.0)
        back = base + (rng.uniform(0, jitter) if jitter else 0.0)
        views.append(RequestView(n, stream, out, back))
    return views
