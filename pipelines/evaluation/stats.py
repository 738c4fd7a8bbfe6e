"""Uncertainty of scores averaged over examples: bootstrap intervals and paired comparisons.

Pure functions over per-example scores (any scale; this project uses 0-100). Resampling is
seeded, so the same scores always give the same interval and p-value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

MIN_EXAMPLES = 2  # a bootstrap of one value has no spread to measure


def tidy(value: float) -> float:
    """Round away float noise (2e-42, 0.30000000000000004) and turn -0.0 into 0.0."""
    return round(float(value), 4) + 0.0


@dataclass(frozen=True, kw_only=True)
class Estimate:
    """A mean over `n` examples and its confidence interval (`low`, `high`; None when n < 2)."""

    value: float
    n: int
    low: float | None = None
    high: float | None = None
    confidence: float = 0.95

    @property
    def half_width(self) -> float | None:
        return None if self.low is None or self.high is None else tidy((self.high - self.low) / 2)

    @property
    def no_interval_reason(self) -> str | None:
        if self.half_width is not None:
            return None
        return f"no interval: {self.n} example{'s' if self.n != 1 else ''}, a bootstrap needs at least {MIN_EXAMPLES}"

    def __str__(self) -> str:
        if self.half_width is None:
            return f"{self.value:.1f}"
        return f"{self.value:.1f} ± {self.half_width:.1f}"

    def describe(self) -> str:
        """`46.3 ± 18.2 (95% CI, n=6)`, or why there is no interval."""
        if self.half_width is None:
            return f"{self} ({self.no_interval_reason})"
        return f"{self} ({self.confidence:.0%} CI, n={self.n})"


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """Paired difference new - old over the same examples, with a sign-flip permutation p-value."""

    delta: Estimate
    p_value: float | None = None

    @property
    def above_zero(self) -> bool:
        """True when the whole interval of the difference lies above 0."""
        return self.delta.low is not None and self.delta.low > 0

    def describe(self) -> str:
        if self.p_value is None:
            return f"{self.delta.value:+.1f} ({self.delta.no_interval_reason})"
        return (f"{self.delta.value:+.1f} ± {self.delta.half_width:.1f} "
                f"({self.delta.confidence:.0%} CI [{self.delta.low:.1f}, {self.delta.high:.1f}], "
                f"p={self.p_value:.3f}, n={self.delta.n})")


def interval(values: Sequence[float], *, confidence: float = 0.95, n_resamples: int = 2000,
             seed: int = 0) -> Estimate:
    """Mean of `values` with a percentile bootstrap interval over examples.

    Percentile rather than BCa: BCa divides by the spread of jackknife estimates, which is zero for
    all-equal scores and unstable for the 0/1-heavy scores a judge gives, so it returns NaN there.
    """
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError("an estimate needs at least one value")
    value = tidy(data.mean())
    if data.size < MIN_EXAMPLES:
        return Estimate(value=value, n=int(data.size), confidence=confidence)
    result = stats.bootstrap((data,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                             method="percentile", rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return Estimate(value=value, n=int(data.size), low=tidy(low), high=tidy(high), confidence=confidence)


def paired_difference(new: Sequence[float], old: Sequence[float], *, confidence: float = 0.95,
                      n_resamples: int = 2000, seed: int = 0) -> Comparison:
    """Mean of per-example differences `new[i] - old[i]`, its bootstrap interval, and a two-sided p-value.

    The p-value is a sign-flip permutation test: if the two programs were exchangeable, each
    example's difference would be as likely negative as positive. With few examples scipy
    enumerates every sign pattern, so the test is exact.
    """
    if len(new) != len(old):
        raise ValueError(f"paired scores must align: {len(new)} new vs {len(old)} old")
    diffs = np.asarray(new, dtype=float) - np.asarray(old, dtype=float)
    delta = interval(diffs, confidence=confidence, n_resamples=n_resamples, seed=seed)
    if delta.low is None:
        return Comparison(delta=delta)
    test = stats.permutation_test((diffs,), np.mean, permutation_type="samples", n_resamples=n_resamples,
                                  alternative="two-sided", rng=np.random.default_rng(seed))
    return Comparison(delta=delta, p_value=tidy(test.pvalue))
