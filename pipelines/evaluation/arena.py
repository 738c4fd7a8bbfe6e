"""RAG-QA Arena's own number: each answer set against the gold long-form answer by a judge that says which
of the two is better, or that they tie, and why. `arena_win_rate` is the share of examples where the
program's answer is preferred; `arena_win_tie_rate` also counts ties (the benchmark reports both; in its
paper the best model's answers beat the gold ones about 41% of the time).

Judges favour whichever answer they read first or second, so the order is fixed by a rule that puts the
program's answer first on about half the examples (by a hash of the question: the same question always in
the same order, so reruns agree and cached verdicts stay valid). Both metrics are 0/100 per example and
averaged, with intervals and paired tests like every other metric.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from typing import Literal

import dspy

log = logging.getLogger(__name__)

WIN, WIN_TIE = "arena_win_rate", "arena_win_tie_rate"
METRICS = (WIN, WIN_TIE)


class PairwiseVerdict(dspy.Signature):
    """Two answers to one technical question are shown. Decide which one serves the person asking better:
    it should be correct first, then useful and complete; being longer is not a merit in itself. Answer
    `tie` only when neither is better."""

    question: str = dspy.InputField()
    answer_a: str = dspy.InputField()
    answer_b: str = dspy.InputField()
    rationale: str = dspy.OutputField(desc="what decided it, in two or three sentences")
    better: Literal["A", "B", "tie"] = dspy.OutputField()


def program_first(question: str) -> bool:
    """The order rule: the program's answer is shown as A on about half the questions."""
    return hashlib.sha256(question.encode()).digest()[0] % 2 == 0


@dataclass(frozen=True)
class Outcome:
    win: bool
    tie: bool
    rationale: str

    def value(self, metric: str) -> float:
        return 100.0 if self.win or (metric == WIN_TIE and self.tie) else 0.0


class ArenaJudge:
    """The pairwise judge on a chosen LM. A verdict that cannot be parsed is a loss for the program, counted
    in `failures` and said in the rationale, never a win or a tie."""

    def __init__(self, lm: dspy.LM | None = None, traced: bool = False):
        self.lm, self.traced = lm, traced
        self.predict = dspy.Predict(PairwiseVerdict)
        self.failures = 0
        self._lock = threading.Lock()

    def __call__(self, example, prediction) -> Outcome:
        first = program_first(example.question)
        a, b = (prediction.response, example.response) if first else (example.response, prediction.response)
        order = f"program's answer shown as {'A' if first else 'B'}"
        try:
            with dspy.context(lm=self.lm or dspy.settings.lm, **({} if self.traced else {"callbacks": []})):
                verdict = self.predict(question=example.question, answer_a=a, answer_b=b)
        except Exception as e:
            with self._lock:
                self.failures += 1
            log.warning("arena judge failed on %r: %s", example.question[:60], e)
            return Outcome(win=False, tie=False, rationale=f"{order}; the judge failed: {e}")
        return Outcome(win=verdict.better == ("A" if first else "B"), tie=verdict.better == "tie",
                       rationale=f"{order}; judge: {verdict.better}; {verdict.rationale}")

    def __deepcopy__(self, memo):
        return self
