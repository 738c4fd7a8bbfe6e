"""The champion rule: when a newly registered program takes the registry's `champion` alias.

Pure functions over per-example scores, beside `stats.py`; `pipelines.tracking.registry` reads the
current champion from MLflow and applies the decision. The rule (`scoring.promotion`):

- `significant` (default): new - champion, example by example on the primary metric, is above 0 by every
  test the project prints: the paired bootstrap interval lies above 0 and the sign-flip permutation test
  gives p below 1 - `scoring.confidence`. At small n the percentile interval is too narrow (with 6
  examples no permutation p can fall below 1/32), so the two can disagree; the verdict names the test
  that decided. Unpaired (the champion's table is missing) means no move. The same test (`shortfall`)
  moves an aligned judge's `champion`: its held-out agreement, aligned - the judge it started from.
- `better`: the new point score beats the champion's, however slightly.

Either way programs are compared only on the same dev set (by content hash), and, on a judged primary
metric (SemanticF1, the arena rates), only when the same judge scored both: a champion scored on other
examples or by another judge stays, since its number says nothing about these. The paired difference is
over the examples scored on both sides (a verdict the judge could not give on either leaves the pair
out), and a version scored on no example is never promoted.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.evaluation.metrics import JUDGED_METRICS, label
from pipelines.evaluation.result import EvalResult, paired_scores
from pipelines.evaluation.scoring import Scoring
from pipelines.evaluation.stats import Comparison, tidy

FIRST = "first registered version becomes champion"


@dataclass(frozen=True, kw_only=True)
class Champion:
    """The current champion as the rule sees it."""

    version: str
    dev_set: str | None           # content hash of the dev set it was scored on
    score: float | None           # its dev score on the primary metric
    rows: list[dict] | None = None  # its per-example dev rows, when they could be read
    judge: str | None = None      # the judge that scored it, where its primary metric is judged


@dataclass(frozen=True, kw_only=True)
class Promotion:
    """The verdict: whether the new version becomes champion, why (one line), and the paired difference
    new - champion on the primary metric when the two could be paired."""

    promoted: bool
    reason: str
    comparison: Comparison | None = None


def decide(*, new: EvalResult, dev_set: str, champion: Champion | None, scoring: Scoring) -> Promotion:
    """Apply `scoring.promotion` to a new version's dev result against the current champion."""
    if new.score is None:  # not even a first version: a champion always has a score
        return Promotion(promoted=False, reason=f"{label(scoring.primary)}: {new.no_example_scored()}; "
                                                "nothing to promote on, champion unchanged")
    if champion is None:
        return Promotion(promoted=True, reason=FIRST)
    if champion.dev_set != dev_set:
        return Promotion(promoted=False, reason=f"champion v{champion.version} was scored on another dev set "
                                                f"({champion.dev_set}); not comparable, champion unchanged")
    metric, name = scoring.primary, label(scoring.primary)
    if metric in JUDGED_METRICS and champion.judge and new.judge and champion.judge != new.judge:
        return Promotion(promoted=False, reason=f"champion v{champion.version}'s {name} was scored by another judge "
                                                f"({champion.judge}, here {new.judge}); not comparable, champion "
                                                "unchanged")
    comparison = None
    if champion.rows is not None:
        ours, theirs = paired_scores(new.rows, champion.rows, metric)
        comparison = scoring.paired(ours, theirs) if ours else None
    if scoring.promotion == "better":
        return _point_rule(new.score, champion, name, comparison)
    if comparison is None:
        return Promotion(promoted=False, reason=f"cannot pair with champion v{champion.version}'s per-example "
                                                f"{name} scores (its dev table is missing or has no such column); "
                                                "champion unchanged")
    why = shortfall(comparison, scoring.confidence)
    if why is None:
        return Promotion(promoted=True, reason=f"beats champion v{champion.version} beyond noise by both tests "
                                               f"(interval above 0, p={comparison.p_value:.3f} < "
                                               f"{tidy(1 - scoring.confidence):g}): {name} {comparison.describe()}",
                         comparison=comparison)
    return Promotion(promoted=False, comparison=comparison,
                     reason=f"not better than champion v{champion.version} beyond noise: {why}; {name} "
                            f"{comparison.describe()}; champion unchanged")


def shortfall(comparison: Comparison, confidence: float) -> str | None:
    """The `significant` rule on a paired difference new - old: None where it lies above 0 by both tests
    (the bootstrap interval above 0, the sign-flip permutation p below 1 - `confidence`), else why not.
    A program's champion and a judge's move by it."""
    if comparison.p_value is None:
        return f"too few paired examples ({comparison.delta.n})"
    alpha, p = tidy(1 - confidence), comparison.p_value
    if not comparison.above_zero:
        return f"its {confidence:.0%} interval's low end {comparison.delta.low:.1f} is not above 0"
    if p >= alpha:
        return (f"its {confidence:.0%} bootstrap interval lies above 0, but the permutation test gives "
                f"p={p:.3f}, not below {alpha:g}")
    return None


def _point_rule(score: float, champion: Champion, label: str, comparison: Comparison | None) -> Promotion:
    if champion.score is None:
        return Promotion(promoted=False, reason=f"champion v{champion.version} has no dev {label} score; not "
                                                "comparable, champion unchanged", comparison=comparison)
    if score > champion.score:
        return Promotion(promoted=True, reason=f"beats champion v{champion.version} on {label} ({score:.1f} > "
                                               f"{champion.score:.1f})", comparison=comparison)
    return Promotion(promoted=False, reason=f"does not beat champion v{champion.version} on {label} ({score:.1f} "
                                            f"<= {champion.score:.1f})", comparison=comparison)
