"""Scoring a program: the `scoring/` config (`Scoring`), the per-example metrics of `Scorer`, and `evaluate`,
which runs the program through `dspy.Evaluate` and keeps one row per example (`result_row`).

Every metric is on 0-100; a failed example scores 0 in each of them, and an answer the judge gave no
verdict on is counted in `judge_failures` and given its own failure mode. Each row also records what the
question cost (LM calls, tokens, dollars) and its failure mode (`analysis.py`); `result.py` averages the
rows with intervals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import dspy

from pipelines.errors import ConfigError
from pipelines.evaluation import arena
from pipelines.evaluation.analysis import failure_mode
from pipelines.evaluation.judge import JudgedF1
from pipelines.evaluation.meter import metered
from pipelines.evaluation.metrics import (
    HOP,
    JUDGED,
    JUDGED_METRICS,
    LEXICAL,
    NO_PREDICTION,
    RECALL,
    is_recall,
    recall_metrics,
)
from pipelines.evaluation.result import EvalResult
from pipelines.evaluation.stats import Comparison, Estimate, interval, paired_difference, tidy
from pipelines.schema import ScoringConfig

USAGE = ("lm_calls", "prompt_tokens", "completion_tokens", "cost_usd")  # per-example cost columns


@dataclass(frozen=True, kw_only=True)
class Scoring:
    """The `scoring/` config: which metrics run, which one decides, how intervals are drawn."""

    metrics: tuple[str, ...]
    primary: str
    confidence: float
    n_resamples: int
    seed: int
    promotion: str
    miss_threshold: float = 50.0
    judge: str | None = None  # aligned judge: as configured, then its state's local file; None: DSPy's SemanticF1
    judge_version: str | None = None  # what runs record of it: `NAME vN` of a registered judge, else its URI
    arena: arena.Settings = arena.Settings()  # the arena judge's few-shot examples and order rule

    @classmethod
    def from_cfg(cls, cfg: ScoringConfig) -> Scoring:
        """Checks what the schema's types cannot: the values fit together. The primary metric is always
        scored, listed in `scoring.metrics` or not (`scoring.primary=semantic_f1` alone brings the judge)."""
        metrics = tuple(dict.fromkeys([*(str(m) for m in cfg.metrics), str(cfg.primary)]))
        if not 0 < cfg.confidence < 1 or cfg.n_resamples < 1:
            raise ConfigError("scoring.confidence must lie in (0, 1) and scoring.n_resamples be positive")
        pairwise = arena.Settings.from_cfg(cfg.arena)
        if pairwise.both_orders and set(arena.METRICS) & set(metrics):
            metrics += (arena.FLIP,)
        return cls(metrics=metrics, primary=str(cfg.primary), confidence=cfg.confidence,
                   n_resamples=cfg.n_resamples, seed=cfg.seed, promotion=str(cfg.promotion),
                   miss_threshold=float(cfg.miss_threshold), judge=cfg.get("judge"), arena=pairwise)

    def interval(self, values: list[float]) -> Estimate:
        return interval(values, confidence=self.confidence, n_resamples=self.n_resamples, seed=self.seed)

    def paired(self, new: list[float], old: list[float]) -> Comparison:
        return paired_difference(new, old, confidence=self.confidence, n_resamples=self.n_resamples, seed=self.seed)


@dataclass
class Scored:
    """One example's metrics (0-100; None where the judge gave no verdict), their rationales where there is
    one, and its trace."""

    values: dict[str, float | None]
    rationales: dict[str, str] = field(default_factory=dict)
    trace_id: str | None = None


class Scorer:
    """Scores examples on the configured metrics; as a DSPy metric (MIPROv2), on the primary one only.

    It has no `__name__`, on purpose: MLflow's DSPy autolog logs a named metric's return value,
    DSPy's 0-1 scale, as a trace assessment. Ours are logged by `tracking.annotate_traces`, every
    metric once, on 0-100.
    """

    def __init__(self, scoring: Scoring, judge: JudgedF1 | None = None, pairwise: arena.ArenaJudge | None = None):
        if JUDGED in scoring.metrics and judge is None:
            raise ValueError("semantic_f1 needs a judge")
        if set(arena.METRICS) & set(scoring.metrics) and pairwise is None:
            raise ValueError("the arena metrics need a pairwise judge")
        self.scoring = scoring
        self.judge = judge
        self.pairwise = pairwise

    @classmethod
    def with_judges(cls, scoring: Scoring, judge_lm: dspy.LM | None, *, traced: bool = False) -> Scorer:
        """A scorer with the judges its metrics need, on `judge_lm`; SemanticF1 aligned where `scoring.judge`
        holds an aligned judge's state (resolved to a local file by `tracking`)."""
        judged = (JudgedF1(judge_lm, traced=traced, aligned=scoring.judge, version=scoring.judge_version)
                  if JUDGED in scoring.metrics else None)
        pairwise = (arena.ArenaJudge(judge_lm, traced=traced, settings=scoring.arena)
                    if set(arena.METRICS) & set(scoring.metrics) else None)
        return cls(scoring, judged, pairwise)

    def __call__(self, example, prediction, trace=None) -> float:
        """The primary metric on DSPy's 0-1 scale (pass/fail for SemanticF1 while bootstrapping demos).

        An optimizer's search needs a number for every example, so here an answer the judge could not
        score counts 0 (and a demo it could not judge does not pass); what is reported and promoted
        (`evaluate`) leaves it out instead.
        """
        value = self.score(example, prediction, (self.scoring.primary,), trace).values[self.scoring.primary]
        return 0.0 if value is None else value / 100

    def score(self, example, prediction, metrics: tuple[str, ...], trace=None) -> Scored:
        if not prediction.get("response"):
            return Scored({m: 0.0 for m in metrics})
        scored = Scored({})
        outcome = None  # one pairwise verdict gives both arena metrics
        for metric in metrics:
            if metric in arena.METRICS:
                outcome = outcome or self.pairwise(example, prediction)
                scored.values[metric] = outcome.value(metric)  # None: the judge gave no verdict
                scored.rationales[metric] = outcome.rationale
            elif metric == JUDGED:
                judged = self.judge(example, prediction, trace)
                scored.values[metric] = None if judged.score is None else tidy(100 * float(judged.score))
                scored.rationales[metric] = judged.feedback
            elif is_recall(metric):
                gold = set(example.get("gold_doc_ids") or [])
                if gold:  # no gold ids, no recall: the example is left out of its mean
                    retrieved = (prediction.get("doc_ids") if metric == RECALL else
                                 prediction.hop_doc_ids[int(metric[len(RECALL + HOP):]) - 1])
                    hits = len(gold & set(retrieved or []))
                    scored.values[metric] = tidy(100 * hits / len(gold))
                    scored.rationales[metric] = f"{hits} of {len(gold)} gold documents retrieved"
            else:
                scored.values[metric] = LEXICAL[metric](prediction.response, example.response)
        return scored


class _Collector:
    """The metric of one `dspy.Evaluate` call: every metric of each example, kept for its row.

    Like the Scorer, it has no `__name__`, so autolog adds no 0-1 copy of the primary to the traces.
    """

    def __init__(self, scorer: Scorer, trace_id: Callable[[], str | None] | None):
        self.scorer = scorer
        self.trace_id = trace_id
        self.scored: dict[int, Scored] = {}

    def __call__(self, example, prediction, trace=None) -> float:
        # First: the metric runs in the thread that just ran the program, before a traced judge
        # starts a trace of its own.
        trace_id = self.trace_id() if self.trace_id else None
        metrics = self.scorer.scoring.metrics + recall_metrics(prediction)
        scored = self.scorer.score(example, prediction, metrics)
        scored.trace_id = trace_id
        self.scored[id(example)] = scored
        return (scored.values[self.scorer.scoring.primary] or 0.0) / 100  # dspy.Evaluate's own total: unused


def evaluate(program, examples: list[dspy.Example], scorer: Scorer, *, num_threads: int, progress: bool = True,
             trace_id: Callable[[], str | None] | None = None) -> EvalResult:
    """Score `program` on `examples`. Failed examples score 0, are counted, and never stop the run; an answer
    the judge could not score is counted (`judge_failures`) and left out of that metric's mean.

    `trace_id` returns the trace of the program call that just finished in this thread (see
    `tracking.last_trace_id`); each row keeps it so its metrics can be attached to that trace.
    """
    def judge_failures() -> int:
        return sum(j.failures for j in (scorer.judge, scorer.pairwise) if j is not None)

    failures_before = judge_failures()
    collector = _Collector(scorer, trace_id)
    evaluator = dspy.Evaluate(devset=examples, metric=collector, num_threads=num_threads,
                              display_progress=progress, max_errors=len(examples) + 1,
                              failure_score=0.0, provide_traceback=False)
    metered_program = Metered(program)
    # Our own table is the record; autolog's duplicate eval run is only wanted inside compile.
    result = evaluator(metered_program, callback_metadata={"disable_logging": True})
    retrieves = any("doc_ids" in pred for _, pred, _ in result.results)
    rows = [result_row(ex, pred, collector.scored.get(id(ex)), scorer.scoring, retrieves=retrieves,
                       usage=metered_program.usage.get(_inputs_key(ex.inputs())))
            for ex, pred, _ in result.results]
    pairwise = scorer.pairwise.lm.model if scorer.pairwise and scorer.pairwise.lm else None
    judge = scorer.judge.name if scorer.judge else pairwise
    return EvalResult.from_rows(rows, scorer.scoring, judge=judge, judge_failures=judge_failures() - failures_before)


def _inputs_key(inputs) -> str:
    return repr(sorted(dict(inputs).items()))


class Metered:
    """A program whose every call is metered (`pipelines.evaluation.meter`): what each example's inputs cost, kept
    also when the program fails, since the calls it made before failing were paid for."""

    def __init__(self, program):
        self.program = program
        self.usage: dict[str, dict] = {}

    def __call__(self, **inputs):
        with metered() as meter:
            try:
                return self.program(**inputs)
            finally:
                self.usage[_inputs_key(inputs)] = meter.as_row()


def result_row(example, prediction, scored: Scored | None, scoring: Scoring, *, retrieves: bool,
               usage: dict | None = None) -> dict:
    pred = dict(prediction.items()) if prediction is not None else {}
    failed = not pred.get("response")
    row = {
        "question": example.question,
        "gold": example.response,
        "reasoning": pred.get("reasoning", ""),
        "prediction": pred.get("response", ""),
        "error": NO_PREDICTION if failed else "",
    }
    names = scoring.metrics + (recall_metrics({"doc_ids": (), **pred}) if retrieves else ())
    gold = example.get("gold_doc_ids")
    for name in names:
        if failed:  # a failed example counts 0 wherever it would have been scored
            value = 0.0 if not is_recall(name) or gold else None
        else:
            value = scored.values.get(name) if scored else None
        row[name] = value
        if name in (*JUDGED_METRICS, RECALL):
            row[f"{name}_rationale"] = row["error"] or (scored.rationales.get(name, "") if scored else "")
    row["failure_mode"] = failure_mode(failed=failed, score=row.get(scoring.primary), threshold=scoring.miss_threshold,
                                       retrieved=pred.get("doc_ids") or [] if retrieves else None, gold=gold)
    row["trace_id"] = scored.trace_id if scored else None
    if retrieves:
        row["passages"] = "\n\n---\n\n".join(pred.get("context") or [])
        row["retrieved_doc_ids"] = list(pred.get("doc_ids") or [])
    for name in ("queries", "hop_doc_ids", "candidates"):  # multihop's searches, an ensemble's answers
        if name in pred:
            row[name] = list(pred[name] or [])
    if "member_errors" in pred:
        row["member_errors"] = int(pred["member_errors"])
    row.update(usage or dict.fromkeys(USAGE))
    return row
