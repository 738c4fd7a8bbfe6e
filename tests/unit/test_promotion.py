"""The champion rule as pure functions: no store, only per-example scores."""

import pytest

from pipelines.evaluation.promotion import FIRST, Champion, decide
from pipelines.evaluation.result import EvalResult

from helpers import dev_result, promotion_scoring


def champion_of(scores, dev_set="dev1", with_rows=True):
    old = dev_result(scores)
    return Champion(version="3", dev_set=dev_set, score=old.score, rows=old.rows if with_rows else None)


BASE = [0, 100] * 10
NOISE = [100, 100, 100, 100, 0, 0] + [0, 100] * 7  # +5 on average: two up, one down
CLEAR = [min(100, s + 60) for s in BASE]


def test_the_first_version_is_champion():
    decision = decide(new=dev_result([10, 20]), dev_set="dev1", champion=None, scoring=promotion_scoring())
    assert decision.promoted and decision.reason == FIRST and decision.comparison is None


@pytest.mark.parametrize("rule", ["significant", "better"])
def test_another_dev_set_is_never_compared(rule):
    decision = decide(new=dev_result(CLEAR, rule), dev_set="dev2", champion=champion_of(BASE),
                      scoring=promotion_scoring(rule))
    assert not decision.promoted and "another dev set" in decision.reason and "v3" in decision.reason


def test_significant_needs_the_paired_interval_above_zero():
    noise = decide(new=dev_result(NOISE), dev_set="dev1", champion=champion_of(BASE), scoring=promotion_scoring())
    assert not noise.promoted and noise.comparison.delta.value == 5.0 and noise.comparison.delta.low < 0
    clear = decide(new=dev_result(CLEAR), dev_set="dev1", champion=champion_of(BASE), scoring=promotion_scoring())
    assert clear.promoted and clear.comparison.above_zero and "beats champion v3 beyond noise" in clear.reason


def test_significant_without_pairs_keeps_the_champion():
    decision = decide(new=dev_result(CLEAR), dev_set="dev1", champion=champion_of(BASE, with_rows=False),
                      scoring=promotion_scoring())
    assert not decision.promoted and "cannot pair" in decision.reason
    one = decide(new=dev_result([70]), dev_set="dev1", champion=champion_of([0]), scoring=promotion_scoring())
    assert not one.promoted and "too few paired examples" in one.reason


def test_better_compares_point_scores_strictly_and_still_reports_the_pairing():
    better = promotion_scoring("better")
    noise = decide(new=dev_result(NOISE, "better"), dev_set="dev1", champion=champion_of(BASE), scoring=better)
    assert noise.promoted and noise.comparison.delta.value == 5.0
    tie = decide(new=dev_result(BASE, "better"), dev_set="dev1", champion=champion_of(BASE), scoring=better)
    assert not tie.promoted and "50.0 <= 50.0" in tie.reason
    unscored = Champion(version="1", dev_set="dev1", score=None)
    assert not decide(new=dev_result(CLEAR, "better"), dev_set="dev1", champion=unscored, scoring=better).promoted


def test_a_percentile_interval_above_zero_does_not_promote_against_the_permutation_test():
    # The README's old main job: 6 paired examples, one tie. The percentile bootstrap interval lies above 0,
    # but with 5 non-zero differences no sign-flip test can give p below 2/32 = 0.0625.
    old = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
    new = [s + d for s, d in zip(old, [10, 12, 15, 11, 14, 0], strict=True)]
    decision = decide(new=dev_result(new), dev_set="dev1", champion=champion_of(old), scoring=promotion_scoring())
    assert decision.comparison.above_zero and decision.comparison.p_value == pytest.approx(0.0625, abs=1e-4)
    assert not decision.promoted
    assert "bootstrap interval lies above 0, but the permutation test gives p=0.062, not below 0.05" in decision.reason
    # Ten such examples carry the evidence: both tests agree and the version is promoted.
    old10, new10 = old + [15.0, 25.0, 35.0, 45.0], new + [27.0, 36.0, 44.0, 58.0]
    promoted = decide(new=dev_result(new10), dev_set="dev1", champion=champion_of(old10), scoring=promotion_scoring())
    assert promoted.promoted and "by both tests" in promoted.reason and promoted.comparison.p_value < 0.05


def test_scores_of_different_judges_are_never_compared():
    old = champion_of(BASE)
    new = EvalResult.from_rows(dev_result(CLEAR).rows, promotion_scoring(), judge="openai/gpt-4o-mini")
    decisions = {judge: decide(new=new, dev_set="dev1", scoring=promotion_scoring(), champion=Champion(
        version="3", dev_set="dev1", score=old.score, rows=old.rows, judge=judge))
        for judge in ("openai/gpt-4o", "openai/gpt-4o-mini")}
    assert decisions["openai/gpt-4o-mini"].promoted
    refused = decisions["openai/gpt-4o"]
    assert not refused.promoted and refused.comparison is None
    assert "scored by another judge (openai/gpt-4o, here openai/gpt-4o-mini)" in refused.reason


def test_only_pairs_scored_on_both_sides_are_compared():
    # 20 questions; the judge gave no verdict on 3 of the new version's answers and on 3 others of the
    # champion's: 14 pairs remain, each +60 or +0.
    new = [None if i in (0, 1, 2) else s for i, s in enumerate(CLEAR)]
    old = [None if i in (3, 4, 5) else s for i, s in enumerate(BASE)]
    decision = decide(new=dev_result(new), dev_set="dev1", champion=champion_of(old), scoring=promotion_scoring())
    kept = [i for i in range(20) if i not in range(6)]
    assert decision.comparison.delta.n == 14
    assert decision.comparison.delta.value == pytest.approx(sum(CLEAR[i] - BASE[i] for i in kept) / 14, abs=1e-3)
    assert decision.promoted and "n=14" in decision.reason
    # With a 0 in place of each missing verdict, the same answers would compare on 20 pairs and differently.
    zeros = decide(new=dev_result([0 if s is None else s for s in new]), dev_set="dev1",
                   champion=champion_of([0 if s is None else s for s in old]), scoring=promotion_scoring())
    assert zeros.comparison.delta.n == 20 and zeros.comparison.delta.value != decision.comparison.delta.value


@pytest.mark.parametrize("rule", ["significant", "better"])
def test_a_version_no_example_was_scored_on_is_never_promoted(rule):
    unscored = dev_result([None, None, None], rule)
    assert unscored.score is None
    for champion in (None, champion_of(BASE)):
        decision = decide(new=unscored, dev_set="dev1", champion=champion, scoring=promotion_scoring(rule))
        assert not decision.promoted and decision.comparison is None
        assert decision.reason == ("SemanticF1: no example scored: the judge gave no verdict on any of the 3 "
                                   "examples; nothing to promote on, champion unchanged")
