"""SemanticF1 with feedback (GEPA's metric), judged by DSPy's DummyLM."""

import dspy
import pytest
from dspy.utils import DummyLM

from pipelines.config import compose
from pipelines.data import load_splits
from pipelines.evaluation.feedback import FeedbackF1

VERDICT = {"reasoning": "r", "ground_truth_key_ideas": "reset the branch", "system_response_key_ideas": "reset",
           "discussion": "the response names the command", "recall": 0.4, "precision": 0.4}


def gold():
    return load_splits(compose("optimize").data).train[0]


@pytest.mark.parametrize("trace", [None, []])
def test_score_is_the_f1_and_feedback_is_the_judges_reading(trace):
    metric = FeedbackF1(DummyLM([VERDICT]))
    # GEPA's five arguments; with a trace SemanticF1 itself would return a bool, not the F1.
    result = metric(gold(), dspy.Prediction(response="use git reset"), trace, "respond.predict", None)
    assert isinstance(result.score, float) and result.score == pytest.approx(0.4)
    for part in ("precision 0.40", "recall 0.40", "Key ideas of the reference answer:\nreset the branch",
                 "Key ideas of the response:\nreset", "the response names the command"):
        assert part in result.feedback
    assert metric.failures == 0


def test_a_failing_judge_scores_zero_and_says_so():
    metric = FeedbackF1(DummyLM([{"reasoning": "no verdict fields"}] * 4))
    result = metric(gold(), dspy.Prediction(response="use git reset"), [], "respond.predict", None)
    assert result.score == 0.0 and "judge failed" in result.feedback and metric.failures == 1


def test_no_response_scores_zero_without_asking_the_judge():
    judge = DummyLM([VERDICT])
    result = FeedbackF1(judge)(gold(), dspy.Prediction(response=""))
    assert result.score == 0.0 and "no response" in result.feedback and judge.history == []
