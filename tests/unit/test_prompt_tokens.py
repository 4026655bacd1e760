"""The front door's prompt-token count: the online correction, and the counter per model."""

from __future__ import annotations

import math
import random

import pytest

from gateway.tokens import (
    CORRECTION_MAX_LOG_RATIO,
    CORRECTION_WEIGHT,
    MAX_REMEMBERED_ESTIMATES,
    PromptCounter,
    PromptTokenCorrection,
    count_prompt_tokens,
)


def drive(correction: PromptTokenCorrection, raw: int, true_ratio: float, rng: random.Random, sigma: float) -> int:
    """One request as the gateway runs it: the corrected estimate it is sent with, then the engine's report."""
    estimated = correction.correct(raw)
    reported = max(1, round(raw * true_ratio * math.exp(rng.gauss(0.0, sigma))))
    correction.observe(raw, reported)
    return estimated


@pytest.mark.parametrize("true_ratio", [2.35, 1.06, 0.7])
def test_the_correction_converges_to_a_biased_ratio(true_ratio):
    rng = random.Random(7)
    correction = PromptTokenCorrection()
    for _ in range(600):
        drive(correction, rng.randint(1024, 8192), true_ratio, rng, sigma=0.3)
    # the lognormal noise has median 1, so the factor learns the median ratio; 600 draws of sigma 0.3 at weight
    # 0.05 leave a standard error of about 0.3 * sqrt(0.05 / 2) = 0.05 in log
    assert abs(math.log(correction.factor / true_ratio)) < 0.12
    assert correction.observations == 600
    assert 0.1 < correction.abs_log_error < 0.4  # about sigma * sqrt(2 / pi) = 0.24


def test_corrected_estimates_match_the_engines_counts_once_learnt():
    rng = random.Random(3)
    correction = PromptTokenCorrection()
    for _ in range(300):
        drive(correction, 2000, 2.0, rng, sigma=0.0)
    assert correction.correct(2000) == pytest.approx(4000, rel=0.01)
    assert correction.abs_log_error < 0.01


def test_one_outlier_moves_the_factor_by_at_most_the_weight_times_the_clamp():
    correction = PromptTokenCorrection()
    correction.observe(4096, 4096 * 1000)
    assert correction.factor == pytest.approx(math.exp(CORRECTION_WEIGHT * CORRECTION_MAX_LOG_RATIO))
    assert correction.factor < 1.08
    correction.observe(4096, 1)
    assert correction.factor == pytest.approx(1.0, abs=0.01)


def test_the_factor_stays_within_its_bounds_under_persistent_extremes():
    correction = PromptTokenCorrection()
    for _ in range(2000):
        correction.observe(4096, 4096 * 100)
    assert correction.factor == pytest.approx(4.0)
    for _ in range(2000):
        correction.observe(4096, 1)
    assert correction.factor == pytest.approx(0.25)


def test_small_prompts_weigh_in_proportion_to_their_size():
    small, full = PromptTokenCorrection(), PromptTokenCorrection()
    small.observe(64, 128)
    full.observe(2048, 4096)
    assert math.log(small.factor) == pytest.approx(math.log(full.factor) * 64 / 1024)


def test_outliers_among_steady_reports_leave_the_factor_near_the_truth():
    rng = random.Random(11)
    correction = PromptTokenCorrection()
    for i in range(1000):
        if i % 50 == 0:  # a 2% share of absurd reports, either way
            correction.observe(4096, 4096 * 500 if i % 100 else 1)
        else:
            drive(correction, 4096, 1.5, rng, sigma=0.1)
    assert abs(math.log(correction.factor / 1.5)) < 0.1


@pytest.mark.parametrize(("estimated", "reported"), [(0, 10), (10, 0), (-3, 5)])
def test_empty_counts_teach_nothing(estimated, reported):
    correction = PromptTokenCorrection()
    correction.observe(estimated, reported)
    assert correction.factor == 1.0
    assert correction.observations == 0


def test_the_counter_scales_text_but_not_token_ids():
    counter = PromptCounter()
    for _ in range(400):
        counter.observe("m", counter.count("m", {"prompt": "x" * 8000}), 4000)
    assert counter.correction("m").factor == pytest.approx(2.0, rel=0.02)
    assert counter.count("m", {"prompt": "x" * 8000}) == pytest.approx(4000, rel=0.02)
    assert counter.raw_count("m", {"prompt": "x" * 8000}) == 2000
    assert counter.count("m", {"prompt": list(range(300))}) == 300
    assert counter.count("m", {"prompt": [[1, 2], [3]]}) == 3
    # another model learns separately
    assert counter.count("other", {"prompt": "x" * 8000}) == 2000
    assert set(counter.corrections()) == {"m", "other"}


def test_reports_that_come_late_do_not_wind_the_factor_up():
    """Under load hundreds of requests are sent before the first report comes back: the counter matches each
    report to the raw count behind the estimate it handed out, so the factor learns the true ratio, not a sum of
    stale residuals."""
    counter = PromptCounter()
    body = {"prompt": "x" * 8192}  # 2,048 estimated tokens; the engine counts 4,096
    for _ in range(5):
        sent = [counter.count("m", body) for _ in range(400)]
        for estimated in sent:
            counter.observe("m", estimated, 4096)
        assert counter.correction("m").factor <= 2.0 + 1e-9
    assert counter.correction("m").factor == pytest.approx(2.0, rel=1e-3)


def test_an_estimate_the_counter_forgot_is_taken_back_through_the_factor():
    counter = PromptCounter()
    for _ in range(200):
        counter.observe("m", counter.count("m", {"prompt": "x" * 8192}), 4096)
    factor = counter.correction("m").factor
    counter.observe("m", round(2048 * factor), 4096)  # never handed out: raw = estimate / factor
    assert counter.correction("m").factor == pytest.approx(factor, rel=1e-3)


def test_a_token_id_request_reported_exactly_leaves_the_factor_alone():
    counter = PromptCounter()
    counter.observe("m", 1000, 2000)
    before = counter.correction("m").factor
    ids = {"prompt": list(range(500))}
    counter.observe("m", counter.count("m", ids), 500)
    assert counter.correction("m").factor == before


def test_a_model_with_the_correction_off_counts_raw_but_still_learns():
    counter = PromptCounter(correct={"m": False})
    for _ in range(100):
        counter.observe("m", counter.count("m", {"prompt": "x" * 4000}), 3000)
    assert counter.count("m", {"prompt": "x" * 4000}) == 1000
    assert counter.correction("m").factor > 2.0


def test_without_observations_the_count_is_the_heuristic():
    body = {"messages": [{"role": "user", "content": "hello world, this is a test"}]}
    assert PromptCounter().count("m", body) == count_prompt_tokens(body)


def test_the_memory_of_estimates_is_bounded_without_reports():
    counter = PromptCounter()
    for n in range(MAX_REMEMBERED_ESTIMATES + 500):
        counter.count("m", {"prompt": "x" * 4 * (n + 1)})
    for _ in range(1000):
        counter.count("m", {"prompt": "same prompt"})
    assert len(counter._raw["m"]) == MAX_REMEMBERED_ESTIMATES
