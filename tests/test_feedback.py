"""SemanticF1 with feedback (GEPA's metric), judged by a fake OpenAI-compatible server."""

import dspy
import pytest

from pipelines.config import compose
from pipelines.data import load_splits
from pipelines.feedback import FeedbackF1
from pipelines.lm import build_adapter, build_lm

from fake_lm import FakeLM


def judge_for(fake: FakeLM):
    cfg = compose("optimize", ["lm=openai", f"lm.api_base={fake.api_base}", "lm.api_key_env=null",
                               f"lm.model=openai/fake-{fake.mode}", "lm.cache=false", "lm.adapter=json_schema",
                               "lm.num_retries=0"])
    return build_lm(cfg.lm), build_adapter(cfg.lm), load_splits(cfg.data).train[0]


@pytest.mark.parametrize("trace", [None, []])
def test_score_is_the_f1_and_feedback_is_the_judges_reading(trace):
    with FakeLM(score=0.4) as fake:
        lm, adapter, gold = judge_for(fake)
        metric = FeedbackF1(lm)
        with dspy.context(adapter=adapter):
            # GEPA's five arguments; with a trace SemanticF1 itself would return a bool, not the F1.
            result = metric(gold, dspy.Prediction(response="use git reset"), trace, "respond.predict", None)
    assert isinstance(result.score, float) and result.score == pytest.approx(0.4)
    for part in ("precision 0.40", "recall 0.40", "Key ideas of the reference answer:\nfake ground_truth_key_ideas",
                 "Key ideas of the response:\nfake system_response_key_ideas", "fake discussion"):
        assert part in result.feedback
    assert metric.failures == 0


def test_a_failing_judge_scores_zero_and_says_so():
    with FakeLM(mode="garbage") as fake:
        lm, adapter, gold = judge_for(fake)
        metric = FeedbackF1(lm)
        with dspy.context(adapter=adapter):
            result = metric(gold, dspy.Prediction(response="use git reset"), [], "respond.predict", None)
    assert result.score == 0.0 and "judge failed" in result.feedback and metric.failures == 1


def test_no_response_scores_zero_without_asking_the_judge():
    with FakeLM() as fake:
        lm, adapter, gold = judge_for(fake)
        result = FeedbackF1(lm)(gold, dspy.Prediction(response=""))
    assert result.score == 0.0 and "no response" in result.feedback and fake.calls == 0
