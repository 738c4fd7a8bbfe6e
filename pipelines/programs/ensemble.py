"""Ensembles for long answers: several programs (or several samples of one) answer, one answer is kept.

`dspy.majority` votes on exact text, which two long answers never share, and `dspy.Ensemble` without a
reducer returns a list. Here the reducer is made for long free text:

- `mbr` (default, judge-free): minimum Bayes risk. Each answer's mean similarity to the others (token F1
  or ROUGE-L) estimates how much it agrees with what the ensemble as a whole says; the answer with the
  highest wins, ties to the earlier member (the better-ranked candidate). Between two answers both means
  are their one similarity, so an `mbr` ensemble is configured with three members or more (`members.check`).
- `select`: an LM reads the candidates and picks one (a bad pick number falls back to `mbr`).
- `merge`: an LM reads the candidates and writes one answer from them.

Members answer concurrently, each through its own LM and adapter. A member that fails on a question is
counted (`member_errors`) and left out, as long as another member answered.
"""

from __future__ import annotations

import contextvars
import logging
from concurrent.futures import ThreadPoolExecutor

import dspy

from pipelines.evaluation.metrics import LEXICAL
from pipelines.programs.rag import RAG
from pipelines.schema import Reducer

log = logging.getLogger(__name__)


class SelectAnswer(dspy.Signature):
    """Several candidate answers to a technical question are given. Pick the one that is most correct,
    complete and useful to the person who asked."""

    question: str = dspy.InputField()
    candidates: list[str] = dspy.InputField(desc="numbered from 1")
    best: int = dspy.OutputField(desc="the number of the best candidate")


class MergeAnswers(dspy.Signature):
    """Several candidate answers to a technical question are given. Write one answer that keeps what the
    candidates get right and agree on, and leaves out what only one of them claims."""

    question: str = dspy.InputField()
    candidates: list[str] = dspy.InputField()
    response: str = dspy.OutputField()


class MembersFailed(RuntimeError):
    """No member of an ensemble answered the question."""


class Member(dspy.Module):
    """One voice of an ensemble: a program answering through its own LM and adapter. A sample of a program
    is a member with a `rollout` id and a `temperature` above 0, so each sample is a distinct LM call."""

    def __init__(self, program: dspy.Module, *, lm: dspy.LM, adapter: dspy.Adapter, label: str,
                 rollout: int | None = None, temperature: float | None = None):
        super().__init__()
        self.program, self.answer_lm, self.adapter, self.label = program, lm, adapter, label
        self.rollout, self.temperature = rollout, temperature  # a sample's id and temperature; None: the program
        self.sampling_lm = lm if rollout is None else lm.copy(rollout_id=rollout, temperature=temperature)

    def forward(self, question: str):
        with dspy.context(lm=self.sampling_lm, adapter=self.adapter):
            return self.program(question=question)


def mbr_pick(answers: list[str], similarity: str = "token_f1") -> int:
    """The index of the answer most similar, on average, to the others (minimum Bayes risk)."""
    if len(answers) < 2:
        return 0
    score = LEXICAL[similarity]
    means = [sum(score(a, b) for j, b in enumerate(answers) if j != i) / (len(answers) - 1)
             for i, a in enumerate(answers)]
    return max(range(len(answers)), key=lambda i: (means[i], -i))


class Ensemble(dspy.Module):
    """`members` answer concurrently; the reducer keeps one answer (`mbr`, `select`) or writes one (`merge`).

    The prediction has the kept answer's `reasoning` and `response` (and, from retrieving members, its
    `context` and `doc_ids`; `merge` keeps every answer's passages), every member's answer as
    `candidates` ("" where it failed), the index of the kept one as `chosen` (-1 for `merge`) and the
    count of members that failed as `member_errors`.
    """

    def __init__(self, members: list[Member], *, reducer: Reducer | str = Reducer.mbr,
                 similarity: str = "token_f1"):
        super().__init__()
        self.members = list(members)
        self.reducer = Reducer(reducer)
        self.similarity = similarity
        if self.reducer is Reducer.select:
            self.select = dspy.ChainOfThought(SelectAnswer)
        elif self.reducer is Reducer.merge:
            self.merge = dspy.ChainOfThought(MergeAnswers)

    @property
    def retrieves(self) -> bool:
        return any(isinstance(m.program, RAG) for m in self.members)

    def forward(self, question: str):
        answers = self._ask(question)
        answered = [i for i, a in enumerate(answers) if not isinstance(a, Exception) and a.get("response")]
        if not answered:
            first = next((a for a in answers if isinstance(a, Exception)), None)
            raise MembersFailed(f"none of the {len(answers)} members answered"
                                + (f"; first error: {type(first).__name__}: {first}" if first else ""))
        responses = [answers[i].response for i in answered]
        retrieval = {"context": [], "doc_ids": []} if self.retrieves else {}
        if self.reducer is Reducer.merge:
            merged = self.merge(question=question, candidates=responses)
            chosen, kept = -1, {"reasoning": merged.reasoning, "response": merged.response}
            for i in answered:
                for name in retrieval:
                    retrieval[name] += list(answers[i].get(name) or [])
        else:
            chosen = answered[self._pick(question, responses)]
            kept = {"reasoning": answers[chosen].get("reasoning", ""), "response": answers[chosen].response}
            retrieval = {name: list(answers[chosen].get(name) or []) for name in retrieval}
        candidates = ["" if isinstance(a, Exception) else str(a.get("response") or "") for a in answers]
        return dspy.Prediction(**kept, **retrieval, candidates=candidates, chosen=chosen,
                               member_errors=len(answers) - len(answered))

    def _ask(self, question: str) -> list:
        """Every member's prediction, or the exception it raised, in member order."""
        def answer(member: Member):
            try:
                return member(question=question)
            except Exception as e:
                log.warning("ensemble member %s failed on %r: %s", member.label, question[:60], e)
                return e

        # Each member runs in a copy of this context: DSPy's settings, the trace's parent span and the
        # question's cost meter follow it into its thread.
        with ThreadPoolExecutor(max_workers=len(self.members)) as pool:
            futures = [pool.submit(contextvars.copy_context().run, answer, m) for m in self.members]
            return [f.result() for f in futures]

    def _pick(self, question: str, responses: list[str]) -> int:
        if self.reducer is Reducer.select and len(responses) > 1:
            best = self.select(question=question, candidates=responses).best
            if isinstance(best, int) and 1 <= best <= len(responses):
                return best - 1
            log.info("the selecting LM named candidate %r of %d; keeping the consensus answer", best, len(responses))
        return mbr_pick(responses, self.similarity)
