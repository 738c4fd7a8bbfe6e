"""Bootstrap intervals and paired comparisons against cases whose answer is known without the code."""

import math
import warnings

import pytest

from pipelines.evaluation.stats import Estimate, interval, paired_difference, tidy


def test_all_equal_scores_give_a_zero_width_interval_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        estimate = interval([50.0] * 6)
    assert (estimate.value, estimate.low, estimate.high, estimate.half_width) == (50.0, 50.0, 50.0, 0.0)
    assert str(estimate) == "50.0 ± 0.0"


def test_binomial_sample_matches_the_analytic_normal_interval():
    scores = [100.0] * 60 + [0.0] * 40
    estimate = interval(scores, n_resamples=5000)
    half = 1.959964 * math.sqrt(0.6 * 0.4 / 100) * 100  # Wald interval of a proportion, in points
    assert estimate.value == 60.0 and estimate.n == 100
    assert estimate.low == pytest.approx(60.0 - half, abs=2.0)
    assert estimate.high == pytest.approx(60.0 + half, abs=2.0)


def test_confidence_level_widens_the_interval():
    scores = [100.0] * 60 + [0.0] * 40
    assert interval(scores, confidence=0.99).half_width > interval(scores, confidence=0.80).half_width


def test_same_seed_same_interval_and_the_seed_is_used():
    scores = [0, 30, 100, 70, 0, 100, 45, 10]
    assert interval(scores, seed=3) == interval(scores, seed=3)
    assert any(interval(scores, seed=s) != interval(scores, seed=3) for s in range(4, 10))


@pytest.mark.parametrize("scores", [[42.0], [0.0]])
def test_fewer_than_two_examples_give_the_score_and_no_interval(scores):
    estimate = interval(scores)
    assert estimate.value == scores[0] and estimate.n == 1
    assert estimate.low is None and estimate.high is None and estimate.half_width is None
    assert "1 example" in estimate.describe() and "at least 2" in estimate.describe()
    comparison = paired_difference(scores, [10.0])
    assert comparison.p_value is None and not comparison.above_zero


def test_describe_says_level_and_size():
    assert Estimate(value=46.3, n=6, low=28.1, high=64.5).describe() == "46.3 ± 18.2 (95% CI, n=6)"


def test_tidy_removes_float_noise():
    assert tidy(2e-42) == 0.0 and tidy(0.1 + 0.2) == 0.3 and str(tidy(-1e-9)) == "0.0"


def test_noise_only_difference_is_not_above_zero():
    old = [0, 100, 0, 100, 100, 0, 100, 0, 0, 100, 0, 100]
    new = [100, 100, 0, 100, 0, 0, 100, 0, 100, 100, 0, 100]  # two flips up, one down
    comparison = paired_difference(new, old)
    assert comparison.delta.value == pytest.approx(100 / 12, abs=1e-3)
    assert comparison.delta.low < 0 < comparison.delta.high and not comparison.above_zero
    assert comparison.p_value > 0.5


def test_consistent_improvement_is_above_zero_with_a_small_p_value():
    old = [10, 20, 30, 40, 50, 60, 70, 80, 20, 30]
    new = [s + 15 + (i % 3) for i, s in enumerate(old)]
    comparison = paired_difference(new, old)
    assert comparison.above_zero and comparison.delta.low >= 15
    # All 10 differences are positive; 2**10 sign patterns fit in the resamples, so the test is exact:
    # only the all-plus and all-minus patterns are as extreme, p = 2 / 2**10.
    assert comparison.p_value == pytest.approx(2 / 2 ** 10, abs=1e-4)


def test_identical_scores_differ_by_exactly_zero():
    comparison = paired_difference([0, 50, 100], [0, 50, 100])
    assert (comparison.delta.value, comparison.delta.half_width, comparison.p_value) == (0.0, 0.0, 1.0)


def test_unaligned_scores_are_rejected():
    with pytest.raises(ValueError, match="align"):
        paired_difference([1, 2], [1])
