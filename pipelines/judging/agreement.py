"""A judge's agreement with people, with intervals: `judge_labelled` pairs the judge's verdicts on labelled
traces with people's; the rest are pure functions of those paired (human, judge) values.

Yes/no labels: accuracy and Cohen's kappa (agreement beyond what the two label rates give by chance), the
judge's 0-1 score cut at a threshold. Numeric labels: Pearson and Spearman r with the judge's score. Each
statistic has a percentile bootstrap interval over the labelled traces (seeded), and n.

People's agreement with each other (`between_reviewers`, Cohen's kappa on the traces two reviewers both
labelled yes/no) is the ceiling the judge's is read against: a judge cannot be held to agree with people
more than they agree among themselves.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import dspy
import numpy as np
from scipy import stats

from pipelines.judging.labels import Consensus, Label, by_reviewer

if TYPE_CHECKING:
    from pipelines.evaluation.judge import JudgedF1


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
    return _bootstrapped(name, lambda idx: statistic(h[idx], j[idx]), len(h), confidence=confidence,
                         n_resamples=n_resamples, seed=seed)


def _bootstrapped(name: str, statistic: Callable[[np.ndarray], float], n: int, *, confidence: float,
                  n_resamples: int, seed: int) -> Agreement:
    """`statistic` of row indices on all n rows, and a percentile bootstrap interval over resampled rows."""
    if n < 2:
        return Agreement(name, statistic(np.arange(n)), None, None, n)
    rng = np.random.default_rng(seed)
    draws = [statistic(idx) for idx in rng.integers(0, n, size=(n_resamples, n))]
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Agreement(name, statistic(np.arange(n)), float(low), float(high), n)


def between_reviewers(given: Sequence[Label], *, confidence: float = 0.95, n_resamples: int = 2000,
                      seed: int = 0) -> Agreement | None:
    """People's agreement with each other: Cohen's kappa between two reviewers on the traces both labelled
    yes/no (each reviewer's last label on a trace); with more than two reviewers, the mean of every pair's
    kappa (Light's kappa), pairs sharing fewer than 2 traces left out. The interval resamples the traces two
    or more reviewers labelled; n counts them. None where no two reviewers share 2 traces, or the labels
    are numeric."""
    shared = [{reviewer: x.value for reviewer, x in by.items()} for by in by_reviewer(list(given)).values()
              if len(by) > 1 and all(isinstance(x.value, bool) for x in by.values())]

    def mean_kappa(idx: np.ndarray) -> float:
        kappas = [cohen_kappa(x, y) for x, y in _reviewer_pairs([shared[i] for i in idx]).values() if len(x) > 1]
        return float(np.mean(kappas)) if kappas else 0.0

    if not any(len(x) > 1 for x, _ in _reviewer_pairs(shared).values()):
        return None
    return _bootstrapped("cohen_kappa", mean_kappa, len(shared), confidence=confidence,
                         n_resamples=n_resamples, seed=seed)


def measure(human: Sequence, judge_scores: Sequence[float], *, threshold: float = 0.5, **bootstrap) -> list[Agreement]:
    """Every statistic that fits the labels' kind: yes/no labels against the judge's score cut at `threshold`
    (accuracy, kappa), numeric ones against the score itself (Pearson, Spearman)."""
    if all(isinstance(v, bool | np.bool_) for v in human):
        judge = [s >= threshold for s in judge_scores]
        return [with_interval("accuracy", accuracy, human, judge, **bootstrap),
                with_interval("cohen_kappa", cohen_kappa, human, judge, **bootstrap)]
    return [with_interval("pearson_r", pearson, human, judge_scores, **bootstrap),
            with_interval("spearman_r", spearman, human, judge_scores, **bootstrap)]


def _reviewer_pairs(rows: list[dict[str, bool]]) -> dict[tuple[str, str], tuple[list[bool], list[bool]]]:
    """Per pair of reviewers, their two labels on each row (trace) both labelled."""
    pairs: dict[tuple[str, str], tuple[list[bool], list[bool]]] = {}
    for row in rows:
        for a, b in itertools.combinations(sorted(row), 2):
            first, second = pairs.setdefault((a, b), ([], []))
            first.append(row[a])
            second.append(row[b])
    return pairs


def confusion(human: Sequence[bool], judge: Sequence[bool]) -> list[dict]:
    """The 2x2 table: one row per human label, a column per judge verdict."""
    pairs = list(zip(human, judge, strict=True))
    return [{"human": "yes" if h else "no", "judge_yes": sum(1 for a, b in pairs if a == h and b),
             "judge_no": sum(1 for a, b in pairs if a == h and not b)} for h in (True, False)]


@dataclass(frozen=True, kw_only=True)
class Judged:
    """The judge's verdicts on labelled traces beside people's: paired values and one row per trace."""

    human: list
    scores: list[float]
    rows: list[dict]


def judge_labelled(judged: JudgedF1, rows: dict[str, dict], consensus: dict[str, Consensus]) -> Judged:
    """The judge's score on each labelled trace (`rows`: question, gold and prediction by trace id) beside
    the people's consensus; an unparseable verdict is counted by `judged`, never scored as agreement."""
    human, scores, table = [], [], []
    for trace_id, row in rows.items():
        before = judged.failures
        verdict = judged(dspy.Example(question=row["question"], response=row["gold"]),
                         dspy.Prediction(response=row["prediction"] or ""))
        if judged.failures > before:
            continue
        human.append(consensus[trace_id].value)
        scores.append(float(verdict.score))
        table.append({"trace_id": trace_id, "question": row["question"], "human": consensus[trace_id].value,
                      "reviewers": consensus[trace_id].reviewers, "judge_score": round(float(verdict.score), 4),
                      "judge_rationale": verdict.feedback})
    return Judged(human=human, scores=scores, rows=table)
