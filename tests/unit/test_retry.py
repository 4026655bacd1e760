"""What a failed try at an engine counts as, and how long the next one waits."""

from __future__ import annotations

import random

import pytest

from gateway.errors import (
    UpstreamConnectionError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from gateway.server.retry import backoff_s


class HighestDraw(random.Random):
    """Draws the top of every range, so a test sees the bound the jitter is drawn under."""

    def uniform(self, a: float, b: float) -> float:
        return b


@pytest.mark.parametrize(
    ("tries", "bound_s"),
    [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)],
)
def test_backoff_doubles_per_failed_try_up_to_its_maximum(tries: int, bound_s: float) -> None:
    assert backoff_s(tries, HighestDraw(), base_s=0.05, max_s=1.0) == pytest.approx(bound_s)


def test_backoff_is_drawn_anywhere_from_zero_to_its_bound() -> None:
    rng = random.Random(7)
    draws = [backoff_s(3, rng, base_s=0.05, max_s=1.0) for _ in range(2000)]
    assert 0.0 <= min(draws) < 0.01 and 0.39 < max(draws) <= 0.4


@pytest.mark.parametrize(
    ("error", "kind", "blame"),
    [
        (UpstreamUnavailableError("refused"), "unavailable", "engine"),
        (UpstreamTimeoutError("slow"), "timeout", "rank"),
        (UpstreamStatusError(503, {}), "http_5xx", "rank"),
        (UpstreamError("stream ended early"), "stream_broken", "rank"),
        (UpstreamConnectionError("connection broke mid-answer"), "stream_broken", "engine"),
    ],
)
def test_each_engine_failure_names_its_kind_and_the_breaker_it_counts_against(
    error: UpstreamError, kind: str, blame: str
) -> None:
    assert (error.failure_kind, error.blame) == (kind, blame)


def test_a_5xx_left_unretried_is_answered_with_the_engine_s_own_error() -> None:
    body = {"error": {"message": "out of memory", "type": "upstream_error", "param": None, "code": 507}}
    error = UpstreamStatusError(507, body)
    assert (error.status, error.body()) == (507, body)
