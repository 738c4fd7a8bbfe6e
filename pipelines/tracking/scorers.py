"""The project's metrics as MLflow scorers, beside MLflow's own RAG and answer judges, for
`mlflow.genai.evaluate(data=traces, scorers=...)`: the `assess` step uses them, and a notebook can too:

    from pipelines.tracking.scorers import build_scorers
    scorers = build_scorers(["token_f1", "retrieval_groundedness"], judge_model="openai:/gpt-4o-mini")
    mlflow.genai.evaluate(data=mlflow.search_traces(run_id=RUN), scorers=scorers)

A program's answer is the trace's `response` output; the gold answer is the expectation `expected_response`
and the gold passages `expected_doc_ids` (`assess` attaches a run's own from its evaluation table). A
scorer that lacks what it needs says so as the assessment's error; it never scores 0 for it.
All values are 0-100 (a judge's yes is 100), as the project's metrics are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dspy
from mlflow.entities import Feedback
from mlflow.genai import scorers as mlflow_scorers

from pipelines.errors import ConfigError
from pipelines.evaluation.judge import JudgedF1
from pipelines.evaluation.metrics import LEXICAL
from pipelines.tracking.judging.labels import EXPECTATION as GOLD
from pipelines.tracking.judging.registry import aligned_state

GOLD_DOCS = "expected_doc_ids"
# MLflow's judges, by the name their assessments carry; each needs a judge model.
BUILTIN = {"retrieval_groundedness": mlflow_scorers.RetrievalGroundedness,
           "retrieval_relevance": mlflow_scorers.RetrievalRelevance,
           "retrieval_sufficiency": mlflow_scorers.RetrievalSufficiency,
           "correctness": mlflow_scorers.Correctness, "guidelines": mlflow_scorers.Guidelines}
PROJECT = ("token_f1", "rouge_l", "recall_at_k", "semantic_f1")
NEEDS_JUDGE = (*BUILTIN, "semantic_f1")
NAMES = (*PROJECT, *BUILTIN)


def check_names(names: list[str], *, judge_model: str | None, guidelines: list[str] | None) -> None:
    """Unknown scorers, or judges without a judge model (or guidelines without guidelines), in one line."""
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise ConfigError(f"scorers: no scorer named {', '.join(unknown)}; choose from {', '.join(NAMES)}")
    judged = [n for n in names if n in NEEDS_JUDGE]
    if judged and not judge_model:
        raise ConfigError(f"scorers {', '.join(judged)} need a judge model: set judge.model (an lm preset's model)")
    if "guidelines" in names and not guidelines:
        raise ConfigError("scorers: guidelines needs guidelines=[...] (the rules an answer must follow)")
    if not names:
        raise ConfigError("scorers=[...] is empty: name at least one scorer")


def build_scorers(names: list[str], *, judge_model: str | None = None, judge_lm: dspy.LM | None = None,
                  aligned: str | None = None, guidelines: list[str] | None = None) -> list:
    """MLflow scorers by name. MLflow's judges run on `judge_model` (`provider:/model`); SemanticF1 on the
    DSPy `judge_lm` (or DSPy's configured LM), with an aligned judge's state when `aligned` names one."""
    check_names(names, judge_model=judge_model or (judge_lm.model if judge_lm else None), guidelines=guidelines)
    made = []
    for name in names:
        if name in BUILTIN:
            extra = {"guidelines": guidelines} if name == "guidelines" else {}
            made.append(BUILTIN[name](model=judge_model, **extra))
        elif name in LEXICAL:
            made.append(lexical(name, LEXICAL[name]))
        elif name == "recall_at_k":
            made.append(recall_at_k())
        else:
            made.append(semantic_f1(judge_lm, aligned=aligned))
    return made


def _answer(outputs: Any) -> str | None:
    if isinstance(outputs, dict):
        outputs = outputs.get("response")
    return outputs if isinstance(outputs, str) else None


def _missing(what: str) -> Feedback:
    return Feedback(value=None, error=f"no {what}: nothing to score against")


def lexical(name: str, metric: Callable[[str, str], float]):
    """Token F1 or ROUGE-L of the answer against the gold answer."""
    def score(outputs=None, expectations=None) -> Feedback | float:
        gold, answer = (expectations or {}).get(GOLD), _answer(outputs)
        if not gold:
            return _missing(f"gold answer (expectation {GOLD})")
        return metric(answer or "", gold)
    return mlflow_scorers.scorer(score, name=name)


def recall_at_k():
    """The share of gold passages among those the program retrieved (its `doc_ids` output), 0-100."""
    def score(outputs=None, expectations=None) -> Feedback | float:
        gold = (expectations or {}).get(GOLD_DOCS)
        retrieved = outputs.get("doc_ids") if isinstance(outputs, dict) else None
        if not gold:
            return _missing(f"gold passages (expectation {GOLD_DOCS})")
        if retrieved is None:
            return _missing("retrieved doc_ids in the trace's outputs (a program that retrieves)")
        return round(100 * len({str(d) for d in gold} & {str(d) for d in retrieved}) / len(gold), 4)
    return mlflow_scorers.scorer(score, name="recall_at_k")


def semantic_f1(judge_lm: dspy.LM | None, *, aligned: str | None = None):
    """The project's SemanticF1 judge (DSPy), aligned when `aligned` is a judge state's path or artifact URI."""
    judged = JudgedF1(judge_lm, aligned=aligned_state(aligned) if aligned else None)

    def score(inputs=None, outputs=None, expectations=None) -> Feedback | float:
        gold, question = (expectations or {}).get(GOLD), (inputs or {}).get("question")
        if not gold or not question:
            return _missing(f"gold answer (expectation {GOLD}) or question")
        failures = judged.failures
        verdict = judged(dspy.Example(question=question, response=gold),
                         dspy.Prediction(response=_answer(outputs) or ""))
        if judged.failures > failures:  # an unparseable verdict is not a 0
            return Feedback(value=None, error=verdict.feedback)
        return Feedback(value=round(100 * float(verdict.score), 4), rationale=verdict.feedback)
    return mlflow_scorers.scorer(score, name="semantic_f1")
