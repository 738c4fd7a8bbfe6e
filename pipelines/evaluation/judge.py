"""SemanticF1, the LM judge of an answer against the gold one, as a metric (`JudgedF1`).

A verdict the judge could not give (unparseable) is missing, not a 0: `score=None`, counted in `failures`,
so the loop (`scoring.py`) leaves the example out of that metric's mean and of any paired difference on it.
"""

from __future__ import annotations

import logging
import threading

import dspy
from dspy.evaluate import SemanticF1 as DSPySemanticF1
from dspy.evaluate.auto_evaluation import f1_score

log = logging.getLogger(__name__)


class SemanticF1(DSPySemanticF1):
    """DSPy's decompositional SemanticF1, also returning the judge's verdict (key ideas, precision, recall)."""

    def __init__(self):
        super().__init__(decompositional=True)

    def forward(self, example, pred, trace=None):
        verdict = self.module(question=example.question, ground_truth=example.response,
                              system_response=pred.response)
        score = f1_score(verdict.precision, verdict.recall)
        return dspy.Prediction(score=score if trace is None else score >= self.threshold, verdict=verdict)


def verdict_rationale(verdict) -> str:
    return (f"precision {verdict.precision:.2f}, recall {verdict.recall:.2f}\n"
            f"gold key ideas: {verdict.ground_truth_key_ideas}\n"
            f"response key ideas: {verdict.system_response_key_ideas}\n"
            f"discussion: {verdict.discussion}")


class JudgedF1:
    """SemanticF1 run by a chosen judge LM, as a DSPy metric: a Prediction with `score` and `feedback`.

    A judge that cannot parse its own output gives `score=None` (no verdict: the answer is neither good
    nor bad) and is counted, instead of taking the program's prediction down with it or scoring it 0.
    The judge's own calls are not traced unless
    asked: they would double the trace count, and each trace costs 40-230 ms of CPU in MLflow's
    sqlite store (bench/trace_cost.py).

    `aligned` is a local file holding an aligned judge's state (`pipelines/judging/align.py`), as tracking
    resolves `scoring.judge` to; `version` is what runs record of it (else the path).
    """

    def __init__(self, judge_lm: dspy.LM | None = None, *, traced: bool = False, aligned: str | None = None,
                 version: str | None = None):
        self.judge_lm = judge_lm
        self.traced = traced
        self.metric = SemanticF1()
        if aligned:  # an aligned judge's instructions and demos
            self.metric.load(aligned)
        self.aligned = version or aligned
        self.failures = 0
        self._lock = threading.Lock()

    @property
    def name(self) -> str | None:
        """Which judge this is: its LM, and the aligned state it carries. Scores of different judges are
        never compared (`promotion.decide`)."""
        model = self.judge_lm.model if self.judge_lm else None
        return f"{model} aligned:{self.aligned}" if self.aligned else model

    def __call__(self, example, prediction, trace=None, *args, **kwargs) -> dspy.Prediction:
        try:
            untraced = {} if self.traced else {"callbacks": []}
            with dspy.context(lm=self.judge_lm or dspy.settings.lm, **untraced):
                judged = self.metric(example, prediction, trace)
        except Exception as e:
            with self._lock:
                self.failures += 1
            log.warning("SemanticF1 judge failed on %r: %s", example.question[:60], e)
            return dspy.Prediction(score=None, feedback=f"the judge failed: {e}")
        return dspy.Prediction(score=judged.score, feedback=verdict_rationale(judged.verdict))

    def __deepcopy__(self, memo):
        return self
