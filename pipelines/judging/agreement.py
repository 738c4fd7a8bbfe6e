"""A judge's agreement with people, with intervals: pure functions of paired (human, judge) values.

Yes/no labels: accuracy and Cohen's kappa (agreement beyond what the two label rates give by chance), the
judge's 0-1 score cut at a threshold. Numeric labels: Pearson and Spearman r with the judge's score. Each
statistic has a percentile bootstrap interval over the labelled traces (seeded), and n.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Agreement:
    name: str
    value: float
    low: float | None
    high: float | None
    n: int

    def describe(self) -> str:
        interval = f", 95% CI [{self.low:.3f}, {self.high:.3f}]" if self.low is not None else ""
        return f"{self.name} = {self.value:.3f}{interval} (n={self.n})"


def accuracy(human: Sequence[bool], judge: Sequence[bool]) -> float:
    return float(np.mean(np.asarray(human) == np.asarray(judge)))


def cohen_kappa(human: Sequence[bool], judge: Sequence[bool]) -> float:
    """(observed - chance agreement) / (1 - chance); 0 where both always say the same one thing."""
    h, j = np.asarray(human, dtype=bool), np.asarray(judge, dtype=bool)
    observed = np.mean(h == j)
    chance = h.mean() * j.mean() + (1 - h.mean()) * (1 - j.mean())
    return 0.0 if chance >= 1 else float((observed - chance) / (1 - chance))


def pearson(human: Sequence[float], judge: Sequence[float]) -> float:
    return _correlation(stats.pearsonr, human, judge)


def spearman(human: Sequence[float], judge: Sequence[float]) -> float:
    return _correlation(stats.spearmanr, human, judge)


def _correlation(fn, human, judge) -> float:
    if np.std(human) == 0 or np.std(judge) == 0:
        return 0.0  # a constant side correlates with nothing
    return float(fn(human, judge)[0])


def with_interval(name: str, statistic: Callable, human: Sequence, judge: Sequence, *, confidence: float = 0.95,
                  n_resamples: int = 2000, seed: int = 0) -> Agreement:
    """The statistic on all pairs and a percentile bootstrap interval over resampled pairs."""
    h, j = np.asarray(human), np.asarray(judge)
    n = len(h)
    if n < 2:
        return Agreement(name, statistic(h, j), None, None, n)
    rng = np.random.default_rng(seed)
    draws = [statistic(h[idx], j[idx]) for idx in rng.integers(0, n, size=(n_resamples, n))]
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Agreement(name, statistic(h, j), float(low), float(high), n)


def measure(human: Sequence, judge_scores: Sequence[float], *, threshold: float = 0.5, **bootstrap) -> list[Agreement]:
    """Every statistic that fits the labels' kind: yes/no labels against the judge's score cut at `threshold`
    (accuracy, kappa), numeric ones against the score itself (Pearson, Spearman)."""
    if all(isinstance(v, bool | np.bool_) for v in human):
        judge = [s >= threshold for s in judge_scores]
        return [with_interval("accuracy", accuracy, human, judge, **bootstrap),
                with_interval("cohen_kappa", cohen_kappa, human, judge, **bootstrap)]
    return [with_interval("pearson_r", pearson, human, judge_scores, **bootstrap),
            with_interval("spearman_r", spearman, human, judge_scores, **bootstrap)]


def confusion(human: Sequence[bool], judge: Sequence[bool]) -> list[dict]:
    """The 2x2 table: one row per human label, a column per judge verdict."""
    pairs = list(zip(human, judge, strict=True))
    return [{"human": "yes" if h else "no", "judge_yes": sum(1 for a, b in pairs if a == h and b),
             "judge_no": sum(1 for a, b in pairs if a == h and not b)} for h in (True, False)]
