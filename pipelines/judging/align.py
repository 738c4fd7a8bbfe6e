"""Align the SemanticF1 judge with people's labels: the judge program itself is compiled to agree with them
(a verdict agrees when its F1 cut at the threshold says what the person said). Labels are split, seeded,
into an alignment share and a held-out share; agreement before and after is measured on the held-out share
only, example by example.

By default (`optimizer=verdicts`, the `Verdicts` teleprompter below) the aligned judge carries demos of
both labels, yes and no: people's verdicts, each with the reviewer's comment where one was written. A demo
of only the verdicts the judge already gives teaches it nothing about the cases it gets wrong, which is why
BootstrapFewShot's demos (its own verdicts that agreed) are not the default. The aligned judge is the judge
program's DSPy state (instructions and demos), loaded into `JudgedF1` by `scoring.judge=<its URI>`.
"""

from __future__ import annotations

import itertools
import logging
import random
from dataclasses import dataclass

import dspy
from dspy.teleprompt import Teleprompter

from pipelines.errors import ConfigError
from pipelines.evaluation.judge import SemanticF1
from pipelines.judging.labels import Consensus

log = logging.getLogger(__name__)


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


class Verdicts(Teleprompter):
    """Demos balanced by label, people's verdicts: for yes and for no, the first `per_label` examples of the
    alignment share (in `split`'s seeded order). The judge judges each once: where it agreed with the person
    its verdict is the demo as it gave it; where it did not, the demo is that verdict turned to the person's
    (precision and recall 1 for yes, 0 for no, its reasoning replaced by the person's). Where the reviewer
    wrote a comment it is the demo's discussion. Demos alternate yes and no."""

    def __init__(self, metric: Agrees, *, per_label: int = 2):
        if not isinstance(metric, Agrees):
            raise TypeError("optimizer=verdicts aligns a judge to people's labels (`-e judge` with align=true); "
                            "a program has no labels to learn from")
        super().__init__()
        self.metric, self.per_label = metric, per_label

    def compile(self, student: JudgeProgram, *, trainset: list[dspy.Example], teacher=None, valset=None,
                **kwargs) -> JudgeProgram:
        demos: dict[bool, list[dspy.Example]] = {True: [], False: []}
        for example in trainset:
            if all(len(found) >= self.per_label for found in demos.values()):
                break
            if len(demos[example.label]) >= self.per_label:
                continue
            try:
                with dspy.context(trace=[]):
                    prediction = student(**example.inputs())
                    _, inputs, verdict = dspy.settings.trace[-1]
            except Exception as e:  # an unparseable verdict: the next example of this label stands in
                log.warning("the judge failed on %r while building demos: %s", example.question[:60], e)
                continue
            demos[example.label].append(_demo(example, inputs, verdict.toDict(),
                                              agreed=bool(self.metric(example, prediction))))
        program = student.deepcopy()
        (predictor,) = program.predictors()
        predictor.demos = _alternating(demos[True], demos[False])
        program._compiled = True
        return program


def _demo(example: dspy.Example, inputs: dict, verdict: dict, *, agreed: bool) -> dspy.Example:
    """The judge's verdict on one example as a demo that says what the person said."""
    said = example.get("rationale")
    if not agreed:
        said = said or f"A person judged this response {'correct' if example.label else 'incorrect'}."
        score = 1.0 if example.label else 0.0
        verdict = {**verdict, "reasoning": said, "precision": score, "recall": score}
    return dspy.Example(**inputs, **{**verdict, **({"discussion": said} if said else {})})


@dataclass(frozen=True)
class Split:
    align: list[dspy.Example]
    held_out: list[dspy.Example]


def split(examples: list[dspy.Example], held_out: float, seed: int) -> Split:
    """A seeded split; each share keeps the yes/no balance of the whole (stratified by label). Each label's
    examples are shuffled, and the alignment share alternates yes and no, so an optimizer that walks it in
    order (BootstrapFewShot, `Verdicts`) meets both from its start."""
    rng = random.Random(seed)
    groups, keep = [], []
    for value in (True, False):
        group = [e for e in examples if e.label is value]
        rng.shuffle(group)
        cut = round(len(group) * held_out)
        keep += group[:cut]
        groups.append(group[cut:])
    return Split(_alternating(*groups), keep)


def _alternating(*groups: list) -> list:
    """The groups' items taken in turn (a, b, a, b, ...), the longer group's rest at the end."""
    return [x for row in itertools.zip_longest(*groups) for x in row if x is not None]


def example(question: str, gold: str, answer: str, *, label: bool, trace_id: str | None = None,
            rationale: str | None = None) -> dspy.Example:
    return dspy.Example(question=question, gold=gold, answer=answer, label=label, trace_id=trace_id,
                        rationale=rationale).with_inputs("question", "gold", "answer")


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


def labelled_split(rows: dict[str, dict], consensus: dict[str, Consensus], *, held_out: float,
                   seed: int) -> Split:
    """The labelled traces (`rows`: question, gold and prediction by trace id) as alignment examples,
    split; labels that are not yes/no, of one kind only, or too few for either share fail with one line."""
    if not all(isinstance(consensus[t].value, bool) for t in rows):
        raise ConfigError("align=true aligns to yes/no labels; these labels are numeric")
    data = [example(row["question"], row["gold"], row["prediction"] or "", label=consensus[t].value, trace_id=t,
                    rationale=consensus[t].rationale) for t, row in rows.items()]
    parts = split(data, held_out, seed)
    if len({e.label for e in parts.align}) < 2:
        given = sum(e.label for e in data)
        raise ConfigError(f"align=true needs yes and no labels to build demos of both: {given} yes and "
                          f"{len(data) - given} no among {len(data)} labelled traces ({len(parts.align)} to align "
                          "on); label traces of the other kind")
    if len(parts.align) < 4 or len(parts.held_out) < 2:
        raise ConfigError(f"{len(data)} labelled traces split into {len(parts.align)} to align on and "
                          f"{len(parts.held_out)} held out: alignment needs at least 4 and 2; label more traces")
    return parts


def held_out_agreement(judge: JudgeProgram, held_out: list[dspy.Example], lm: dspy.LM, *,
                       threshold: float) -> list[float | None]:
    """Per held-out example, 100 where the judge's verdict (cut at `threshold`) says what the person said,
    0 where not, None where the verdict could not be parsed."""
    scores = verdicts(judge, held_out, lm)
    return [None if s is None else 100.0 * ((s >= threshold) == e.label)
            for s, e in zip(scores, held_out, strict=True)]


def both_given(after: list[float | None], before: list[float | None]) -> tuple[list[float], list[float]]:
    """The pairs where both judges gave a verdict: a missing one is left out, never counted as disagreement."""
    pairs = [(a, b) for a, b in zip(after, before, strict=True) if a is not None and b is not None]
    return [a for a, _ in pairs], [b for _, b in pairs]
