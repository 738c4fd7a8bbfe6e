"""An evaluation's result: its rows averaged per metric with intervals, and two results compared paired by
question, each metric over the examples both scored."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipelines.evaluation.analysis import failure_counts, usage_means
from pipelines.evaluation.metrics import is_recall, label
from pipelines.evaluation.stats import Comparison, Estimate

if TYPE_CHECKING:  # only its type: scoring.py returns an EvalResult
    from pipelines.evaluation.scoring import Scoring


@dataclass(frozen=True, kw_only=True)
class EvalResult:
    rows: list[dict]
    estimates: dict[str, Estimate]  # per metric: mean over the examples scored on it (0-100), its interval, n
    primary: str
    judge_failures: int = 0
    judge: str | None = None  # the judge LM, source of the semantic_f1 assessments
    unscored: tuple[str, ...] = ()  # configured metrics no example was scored on (the judge never gave a verdict)

    @classmethod
    def from_rows(cls, rows: list[dict], scoring: Scoring, *, judge_failures: int = 0,
                  judge: str | None = None) -> EvalResult:
        recalls = sorted({k for r in rows for k in r if is_recall(k) and not k.endswith("_rationale")})
        names = [m for m in (*scoring.metrics, *recalls) if any(r.get(m) is not None for r in rows)]
        estimates = {m: scoring.interval([r[m] for r in rows if r.get(m) is not None]) for m in names}
        return cls(rows=rows, estimates=estimates, primary=scoring.primary, judge_failures=judge_failures,
                   judge=judge, unscored=tuple(m for m in scoring.metrics
                                               if m not in estimates and any(m in r for r in rows)))

    @property
    def score(self) -> float | None:
        """The primary metric's mean; None when no example was scored on it."""
        estimate = self.estimates.get(self.primary)
        return None if estimate is None else estimate.value

    @property
    def num_examples(self) -> int:
        return len(self.rows)

    @property
    def failed(self) -> int:
        return sum(1 for r in self.rows if r.get("error"))

    @property
    def failure_counts(self) -> dict[str, int]:
        return failure_counts(self.rows)

    @property
    def usage(self) -> dict[str, float | None]:
        """LM calls, tokens and cost per question (`analysis.usage_means`)."""
        return usage_means(self.rows)

    def headline(self) -> str:
        """`SemanticF1 = 46.3 ± 18.2 (95% CI, n=6)`, with how many examples the judge left unscored, or
        that it scored none."""
        return f"{label(self.primary)}{': ' if self.score is None else ' = '}{self.describe(self.primary)}"

    def describe(self, metric: str) -> str:
        """One metric's `46.3 ± 18.2 (95% CI, n=6)`, saying how many examples the judge left unscored."""
        estimate = self.estimates.get(metric)
        if estimate is None:
            return self.no_example_scored()
        unscored = self.num_examples - estimate.n
        return estimate.describe() + (f", {unscored} of {self.num_examples} examples unscored (no judge verdict)"
                                      if unscored and not is_recall(metric) else "")

    def no_example_scored(self) -> str:
        # A failed example scores 0 in every metric, so a metric is unscored only when no answer got a verdict.
        return f"no example scored: the judge gave no verdict on any of the {self.num_examples} examples"

    def summary(self) -> str:
        """Every metric, primary first, with its n where it is not every example:
        `SemanticF1 = 90.0 ± 3.1 (n=3), token F1 = 20.5 ± 2.0 (95% CI, n=6)`."""
        names = [self.primary, *(m for m in (*self.estimates, *self.unscored) if m != self.primary)]
        parts = []
        for m in names:
            estimate = self.estimates.get(m)
            if estimate is None:
                parts.append(f"{label(m)}: no example scored")
            else:
                parts.append(f"{label(m)} = {estimate}" + (f" (n={estimate.n})" if estimate.n != self.num_examples
                                                            else ""))
        spread = next((e for e in self.estimates.values() if e.half_width is not None), None)
        first = next(iter(self.estimates.values()), None)
        tail = (f"{spread.confidence:.0%} CI, n={self.num_examples}" if spread else
                first.no_interval_reason if first else f"n={self.num_examples}")
        return f"{', '.join(parts)} ({tail})"


def paired_scores(new_rows: list[dict], old_rows: list[dict], metric: str) -> tuple[list[float], list[float]]:
    """One metric's per-example scores of two result tables, paired by question: only the questions scored on
    both sides, so both means are over the same examples."""
    old = {r["question"]: r.get(metric) for r in old_rows}
    pairs = [(r[metric], old[r["question"]]) for r in new_rows
             if r.get(metric) is not None and old.get(r["question"]) is not None]
    return [n for n, _ in pairs], [o for _, o in pairs]


def compare(new: EvalResult, old: EvalResult, scoring: Scoring) -> dict[str, Comparison]:
    """new - old on every metric both have, over the examples both scored (the difference's n)."""
    comparisons = {}
    for metric in new.estimates:
        if metric in old.estimates:
            a, b = paired_scores(new.rows, old.rows, metric)
            if a:
                comparisons[metric] = scoring.paired(a, b)
    return comparisons
