"""RAG-QA Arena's own number, by its protocol: a judge reads the program's answer and the gold long-form
answer and prefers answer 1 or answer 2, or says 0 when it is not sure, after a few words of reasoning.
`arena_win_rate` is the share of examples where the program's answer is preferred; `arena_win_tie_rate`
also counts the ties, and "not sure" is a tie, as in the benchmark's report (in its paper the best model's
answers beat the gold ones about 41% of the time).

The rubric is the benchmark's, in our words and in its order: truthfulness before helpfulness, and what
the judge cannot verify counts as untruthful. Its few-shot examples are the user's own labelled pairs
(`scoring.arena.examples`), shown to the judge as DSPy demos.

Judges favour whichever answer they read first or second. By default each question is judged once, in
an order fixed by a hash of the question: the program's answer is answer 1 on about half the questions,
and the same question always in the same order, so reruns agree and cached verdicts stay valid. With
`scoring.arena.both_orders` each question is judged in both orders: a win needs both verdicts to prefer
the program's answer, a loss both to prefer the gold one, anything else is a tie; how often the two
verdicts differ is `arena_order_flip_rate`, the judge's position bias on these questions.

A verdict the judge does not give (the LM fails, or its output does not parse) scores nothing: the
outcome is marked failed, its values are None, and it is counted in `failures`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import dspy

from pipelines.errors import ConfigError

log = logging.getLogger(__name__)

WIN, WIN_TIE, FLIP = "arena_win_rate", "arena_win_tie_rate", "arena_order_flip_rate"
METRICS = (WIN, WIN_TIE, FLIP)  # all from one outcome; FLIP only where both orders were judged
VERDICTS = ("1", "2", "0")
PROGRAM, GOLD, NOT_SURE = "program", "gold", "not sure"
_SAYS = {PROGRAM: "prefers the program's answer", GOLD: "prefers the gold answer", NOT_SURE: "not sure"}


class PairwiseVerdict(dspy.Signature):
    """Compare two answers to one question and say which you prefer, judging truthfulness before helpfulness.

    Helpful information is relevant to answering the question; the best answer holds nothing else.
    Truthful information is helpful information you believe is correct. Treat as untruthful anything you
    cannot confirm: a claim without enough context to check it, or contradicting statements the answer
    leaves unresolved.

    Decide by the first of these rules that separates the two answers:
    1. If only one answer is free of untruthful information, prefer it.
    2. If both contain untruthful information, prefer the one with less of it.
    3. If both are entirely truthful, prefer the one with more truthful, helpful information.
    4. If they are equally good, or the rules above do not settle it, you are not sure.
    """

    question: str = dspy.InputField()
    answer_1: str = dspy.InputField()
    answer_2: str = dspy.InputField()
    reasoning: str = dspy.OutputField(desc="what decided it, in fewer than 50 words")
    verdict: Literal["1", "2", "0"] = dspy.OutputField(desc="1: prefer answer 1; 2: prefer answer 2; 0: not sure")


@dataclass(frozen=True, kw_only=True)
class Demo:
    """One of the user's labelled pairs, a few-shot example for the judge."""

    question: str
    answer_1: str
    answer_2: str
    verdict: str
    reasoning: str | None = None

    def as_example(self) -> dspy.Example:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return dspy.Example(**fields).with_inputs("question", "answer_1", "answer_2")


_TEXTS = ("question", "answer_1", "answer_2")


def _demo(row) -> Demo:
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in (*_TEXTS, "verdict") if k not in row]
    unknown = sorted(set(row) - {*_TEXTS, "verdict", "reasoning"})
    problems = [f"{what} {', '.join(keys)}" for what, keys in (("missing", missing), ("unknown", unknown)) if keys]
    if problems:
        raise ValueError("; ".join(problems))
    if any(not isinstance(row[k], str) or not row[k].strip() for k in _TEXTS):
        raise ValueError(f"{', '.join(_TEXTS)} must be non-empty text")
    if isinstance(row["verdict"], bool) or str(row["verdict"]) not in VERDICTS:
        raise ValueError(f"verdict {row['verdict']!r} is not 1, 2 or 0")
    if not isinstance(row.get("reasoning", ""), str):
        raise ValueError("reasoning must be text")
    return Demo(question=row["question"], answer_1=row["answer_1"], answer_2=row["answer_2"],
                verdict=str(row["verdict"]), reasoning=row.get("reasoning") or None)


def read_demos(path: str) -> tuple[Demo, ...]:
    """`scoring.arena.examples`: JSON Lines of question, answer_1, answer_2, verdict (1, 2 or 0) and, if
    wanted, reasoning. A row that does not fit is one line naming the file and the row."""
    where = f"scoring.arena.examples={path}"
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    demos = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                demos.append(_demo(json.loads(line)))
            except ValueError as e:  # json.JSONDecodeError is one
                raise ConfigError(f"{where}, row {number}: {e}") from None
    if not demos:
        raise ConfigError(f"{where}: no examples in it")
    return tuple(demos)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """`scoring.arena`: the judge's few-shot examples, and whether each question is judged in both orders."""

    demos: tuple[Demo, ...] = ()
    both_orders: bool = False

    @classmethod
    def from_cfg(cls, cfg) -> Settings:
        return cls(demos=read_demos(cfg.examples) if cfg.examples else (), both_orders=bool(cfg.both_orders))


def program_first(question: str) -> bool:
    """The single-order rule: the program's answer is shown as answer 1 on about half the questions."""
    return hashlib.sha256(question.encode()).digest()[0] % 2 == 0


def preferred(verdict: str, *, program_first: bool) -> str:
    """The side a verdict prefers, given where the program's answer was shown."""
    if verdict == "0":
        return NOT_SURE
    return PROGRAM if (verdict == "1") == program_first else GOLD


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """One example's pairwise result: the side each judged order preferred (one order, or both)."""

    sides: tuple[str, ...] = ()
    rationale: str
    failed: bool = False

    @property
    def win(self) -> bool:
        return bool(self.sides) and all(s == PROGRAM for s in self.sides)

    @property
    def tie(self) -> bool:
        return bool(self.sides) and not self.win and not all(s == GOLD for s in self.sides)

    @property
    def flipped(self) -> bool | None:
        return self.sides[0] != self.sides[1] if len(self.sides) == 2 else None

    def value(self, metric: str) -> float | None:
        """0 or 100; None where nothing was judged: a failed verdict, or the flip rate of a single order."""
        if self.failed:
            return None
        if metric == FLIP:
            return None if self.flipped is None else 100.0 * self.flipped
        return 100.0 if self.win or (metric == WIN_TIE and self.tie) else 0.0


class ArenaJudge:
    """The pairwise judge on a chosen LM, with the user's few-shot examples."""

    def __init__(self, lm: dspy.LM | None = None, *, traced: bool = False, settings: Settings = Settings()):
        self.lm, self.traced, self.both_orders = lm, traced, settings.both_orders
        self.predict = dspy.Predict(PairwiseVerdict)
        self.predict.demos = [d.as_example() for d in settings.demos]
        self.failures = 0
        self._lock = threading.Lock()

    def __call__(self, example, prediction) -> Outcome:
        orders = (True, False) if self.both_orders else (program_first(example.question),)
        sides, notes = [], []
        for first in orders:
            shown = f"program's answer shown as {1 if first else 2}"
            one, two = (prediction.response, example.response) if first else (example.response, prediction.response)
            try:
                with dspy.context(lm=self.lm or dspy.settings.lm, **({} if self.traced else {"callbacks": []})):
                    judged = self.predict(question=example.question, answer_1=one, answer_2=two)
            except Exception as e:
                with self._lock:
                    self.failures += 1
                log.warning("arena judge failed on %r: %s", example.question[:60], e)
                return Outcome(failed=True, rationale=f"{shown}; the judge gave no verdict: {e}")
            sides.append(preferred(judged.verdict, program_first=first))
            notes.append(f"{shown}; judge: {judged.verdict} ({_SAYS[sides[-1]]}); {judged.reasoning}")
        if len(sides) == 2:
            notes.append(f"the verdict {'changed' if sides[0] != sides[1] else 'held'} with the order")
        return Outcome(sides=tuple(sides), rationale="\n".join(notes))

    def __deepcopy__(self, memo):
        return self
