"""SemanticF1 with feedback, the metric GEPA learns from.

GEPA calls `metric(gold, pred, trace, pred_name, pred_trace)` and wants `dspy.Prediction(score, feedback)`.
`SemanticF1` fits neither: its forward takes three arguments, and it returns a bool instead of the F1
whenever `trace` is set (as it is inside GEPA). So this calls the decompositional judge's predictor
itself: the F1 comes from its precision and recall, the feedback from what it wrote, so the reflection
LM reads which key ideas of the reference answer the response missed and which it added.
"""

from __future__ import annotations

import logging

import dspy
from dspy.evaluate.auto_evaluation import f1_score

from pipelines.evaluation.judge import JudgedF1

log = logging.getLogger(__name__)


class FeedbackF1(JudgedF1):
    """`SemanticF1(decompositional=True)` by the same judge as `JudgedF1`, returning score and feedback.

    A judge failure is counted, as in `JudgedF1`, and scores 0 with a feedback that says so: GEPA's search
    needs a number for every example, whereas a reported score leaves such an example out.
    """

    def __init__(self, judge_lm: dspy.LM | None = None, *, traced: bool = False):
        super().__init__(judge_lm, traced=traced)
        self.judge = self.metric.module  # SemanticF1's ChainOfThought over the decompositional signature
        self.__name__ = "semantic_f1_feedback"

    def __call__(self, gold, pred, trace=None, pred_name=None, pred_trace=None) -> dspy.Prediction:
        response = getattr(pred, "response", None)
        if not response:
            return dspy.Prediction(score=0.0, feedback="The program gave no response (its output could not be "
                                                         "parsed), so nothing of the reference answer was covered.")
        try:
            untraced = {} if self.traced else {"callbacks": []}
            with dspy.context(lm=self.judge_lm or dspy.settings.lm, **untraced):
                verdict = self.judge(question=gold.question, ground_truth=gold.response, system_response=response)
            score = f1_score(float(verdict.precision), float(verdict.recall))
        except Exception as e:
            with self._lock:
                self.failures += 1
            log.warning("SemanticF1 judge failed on %r: %s", gold.question[:60], e)
            return dspy.Prediction(score=0.0, feedback=f"The SemanticF1 judge failed on this response "
                                                       f"({type(e).__name__}), so there is no feedback; scored 0.")
        return dspy.Prediction(score=score, feedback=feedback_text(verdict, score))


def feedback_text(verdict: dspy.Prediction, score: float) -> str:
    return (f"SemanticF1 {score:.2f}: precision {float(verdict.precision):.2f}, recall {float(verdict.recall):.2f}. "
            "Recall below 1 means the response missed key ideas of the reference answer; precision below 1 "
            "means it said things the reference does not.\n"
            f"Key ideas of the reference answer:\n{verdict.ground_truth_key_ideas}\n"
            f"Key ideas of the response:\n{verdict.system_response_key_ideas}\n"
            f"Judge's discussion of their overlap:\n{verdict.discussion}")
