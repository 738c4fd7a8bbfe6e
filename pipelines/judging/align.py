"""Align the SemanticF1 judge with people's labels: DSPy compiles the judge program itself, with the
optimizers the project runs for programs, to agree with the labels (a verdict agrees when its F1 cut at
the threshold says what the person said). Labels are split, seeded, into an alignment share and a held-out
share; agreement before and after is measured on the held-out share only, example by example.

With BootstrapFewShot (the default) the aligned judge carries, as demos, its own verdicts that agreed with
people: the cases it gets right, shown before every new case. The aligned judge is the judge program's
DSPy state (instructions and demos), loaded into `JudgedF1` by `scoring.judge=<its URI>`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import dspy

from pipelines.evaluation.scoring import SemanticF1


class JudgeProgram(dspy.Module):
    """The SemanticF1 judge as a program of (question, gold, answer): what an optimizer compiles."""

    def __init__(self):
        super().__init__()
        self.judge = SemanticF1()

    def forward(self, question: str, gold: str, answer: str) -> dspy.Prediction:
        return self.judge(dspy.Example(question=question, response=gold), dspy.Prediction(response=answer))


class Agrees:
    """The alignment metric: the judge's verdict, cut at `threshold`, says what the person said."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, example, prediction, trace=None) -> bool:
        return (float(prediction.score) >= self.threshold) == example.label


@dataclass(frozen=True)
class Split:
    align: list[dspy.Example]
    held_out: list[dspy.Example]


def split(examples: list[dspy.Example], held_out: float, seed: int) -> Split:
    """A seeded split; each share keeps the yes/no balance of the whole (stratified by label)."""
    rng = random.Random(seed)
    align, keep = [], []
    for value in (True, False):
        group = [e for e in examples if e.label is value]
        rng.shuffle(group)
        cut = round(len(group) * held_out)
        keep += group[:cut]
        align += group[cut:]
    return Split(align, keep)


def example(question: str, gold: str, answer: str, label: bool, trace_id: str | None = None) -> dspy.Example:
    return dspy.Example(question=question, gold=gold, answer=answer, label=label,
                        trace_id=trace_id).with_inputs("question", "gold", "answer")


def verdicts(judge: JudgeProgram, examples: list[dspy.Example], lm: dspy.LM) -> list[float | None]:
    """The judge's 0-1 score per example; None where its verdict could not be parsed (never agreement)."""
    scores = []
    with dspy.context(lm=lm, callbacks=[]):
        for ex in examples:
            try:
                scores.append(float(judge(**ex.inputs()).score))
            except Exception:  # an unparseable verdict: counted by the caller
                scores.append(None)
    return scores
