"""SemanticF1 through `dspy.Evaluate`, turned into one row per example."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import dspy
from dspy.evaluate import SemanticF1

log = logging.getLogger(__name__)


class JudgedF1:
    """`SemanticF1(decompositional=True)` run by a chosen judge LM.

    A judge that cannot parse its own output scores the example 0 and is counted, instead of
    taking the program's prediction down with it. The judge's own calls are not traced unless
    asked: they would double the trace count, and each trace costs 40-230 ms of CPU in MLflow's
    sqlite store (bench/trace_cost.py).
    """

    def __init__(self, judge_lm: dspy.LM | None = None, traced: bool = False):
        self.judge_lm = judge_lm
        self.traced = traced
        self.metric = SemanticF1(decompositional=True)
        self.failures = 0
        self._lock = threading.Lock()
        self.__name__ = "semantic_f1"

    def __call__(self, example, prediction, trace=None, *args, **kwargs):
        try:
            untraced = {} if self.traced else {"callbacks": []}
            with dspy.context(lm=self.judge_lm or dspy.settings.lm, **untraced):
                return self.metric(example, prediction, trace)
        except Exception as e:
            with self._lock:
                self.failures += 1
            log.warning("SemanticF1 judge failed on %r: %s", example.question[:60], e)
            return 0.0

    def __deepcopy__(self, memo):
        return self


@dataclass
class EvalResult:
    score: float  # 0-100, as the tutorial reports it
    rows: list[dict] = field(default_factory=list)
    failed: int = 0
    judge_failures: int = 0

    @property
    def num_examples(self) -> int:
        return len(self.rows)


def recall_at_k(retrieved: list, gold: list | None) -> float | None:
    if not gold or retrieved is None:
        return None
    return len(set(retrieved) & set(gold)) / len(set(gold))


def evaluate(program, examples: list[dspy.Example], metric: JudgedF1, num_threads: int,
             progress: bool = True) -> EvalResult:
    """Score `program` on `examples`. Failed examples score 0, are counted, and never stop the run."""
    failures_before = metric.failures
    evaluator = dspy.Evaluate(devset=examples, metric=metric, num_threads=num_threads,
                              display_progress=progress, max_errors=len(examples) + 1,
                              failure_score=0.0, provide_traceback=False)
    # Our own table is the record; autolog's duplicate eval run is only wanted inside compile.
    result = evaluator(program, callback_metadata={"disable_logging": True})
    rows = [result_row(ex, pred, score) for ex, pred, score in result.results]
    return EvalResult(score=float(result.score), rows=rows,
                      failed=sum(1 for r in rows if r["error"]),
                      judge_failures=metric.failures - failures_before)


def result_row(example, prediction, score) -> dict:
    pred = dict(prediction.items()) if prediction is not None else {}
    row = {
        "question": example.question,
        "gold": example.response,
        "reasoning": pred.get("reasoning", ""),
        "prediction": pred.get("response", ""),
        "score": float(score or 0.0),
        "error": "" if pred.get("response") else "no prediction: LM call or output parsing failed",
    }
    if "doc_ids" in pred:
        row["passages"] = "\n\n---\n\n".join(pred.get("context") or [])
        row["retrieved_doc_ids"] = list(pred["doc_ids"])
        row["recall_at_k"] = recall_at_k(pred["doc_ids"], example.get("gold_doc_ids"))
    return row


def mean_recall(rows: list[dict]) -> float | None:
    values = [r["recall_at_k"] for r in rows if r.get("recall_at_k") is not None]
    return sum(values) / len(values) if values else None
