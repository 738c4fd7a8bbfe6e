"""Per-example metrics through `dspy.Evaluate`, one row per example, averaged with intervals.

SemanticF1 asks an LM judge. Token F1 and ROUGE-L compare words with the gold answer: no LM, so a
rerun gives the same number. recall@k scores retrieval where the data has gold document ids: on the
passages the answer step read, and for a multi-hop program on each search's own (`recall_at_k_hop<N>`).
Every metric is on 0-100, per example and averaged; a failed example scores 0 in each of them. A verdict
the judge could not give (unparseable) is missing, not a 0: the example is left out of that metric's mean
and of any paired difference on it, counted in `judge_failures` and given its own failure mode. Each row
also records what the question cost (LM calls, tokens, dollars) and its failure mode (`analysis.py`).
"""

from __future__ import annotations

import functools
import logging
import re
import string
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import dspy
from dspy.evaluate import SemanticF1 as DSPySemanticF1
from dspy.evaluate.auto_evaluation import f1_score

from pipelines.errors import ConfigError
from pipelines.evaluation import arena
from pipelines.evaluation.analysis import failure_counts, failure_mode, usage_means
from pipelines.evaluation.meter import metered
from pipelines.evaluation.stats import Comparison, Estimate, interval, paired_difference, tidy
from pipelines.schema import Metric, ScoringConfig

log = logging.getLogger(__name__)

JUDGED = str(Metric.semantic_f1)
JUDGED_METRICS = (JUDGED, *arena.METRICS)  # the metrics an LM judge scores
RECALL = "recall_at_k"  # always scored for a retrieving program, never primary: CoT has none
HOP = "_hop"            # recall_at_k_hop1, ...: a multi-hop program's recall of each search on its own
LABELS = {JUDGED: "SemanticF1", "token_f1": "token F1", "rouge_l": "ROUGE-L", RECALL: "recall@k",
          arena.WIN: "arena win rate", arena.WIN_TIE: "arena win+tie rate", arena.FLIP: "arena order flip rate"}
NO_PREDICTION = "no prediction: LM call or output parsing failed"
USAGE = ("lm_calls", "prompt_tokens", "completion_tokens", "cost_usd")  # per-example cost columns


def label(metric: str) -> str:
    """How a metric is named on the console and in charts: `recall_at_k_hop2` is `recall@k hop 2`."""
    if metric.startswith(RECALL + HOP):
        return f"{LABELS[RECALL]} hop {metric[len(RECALL + HOP):]}"
    return LABELS[metric]


def is_recall(metric: str) -> bool:
    return metric.startswith(RECALL)


def recall_metrics(prediction) -> tuple[str, ...]:
    """The recall metrics of a retrieving program's prediction: overall, and per search where it searched
    more than once; none for a program that does not retrieve."""
    if "doc_ids" not in prediction:
        return ()
    hops = len(prediction.get("hop_doc_ids") or [])
    return (RECALL, *(f"{RECALL}{HOP}{h}" for h in range(1, hops + 1) if hops > 1))


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
    judge: str | None = None  # an aligned SemanticF1 judge's state (path or artifact URI); None: DSPy's own
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


# ---------------------------------------------------------------------------------------------
# Judge-free metrics

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def answer_tokens(text: str) -> list[str]:
    """SQuAD's normalisation: lowercase, drop punctuation, drop articles, split on whitespace."""
    return _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split()


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 (0-100): harmonic mean of the shared-token precision and recall."""
    pred, ref = answer_tokens(prediction), answer_tokens(gold)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return tidy(100 * 2 * precision * recall / (precision + recall))


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer  # imported on first use: it pulls in nltk (~2 s)

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, gold: str) -> float:
    """ROUGE-L F-measure (0-100, Porter-stemmed) from Google's `rouge-score`."""
    return tidy(100 * _rouge_scorer().score(gold, prediction)["rougeL"].fmeasure)


LEXICAL: dict[str, Callable[[str, str], float]] = {"token_f1": token_f1, "rouge_l": rouge_l}


# ---------------------------------------------------------------------------------------------
# The judge


class SemanticF1(DSPySemanticF1):
    """DSPy's decompositional SemanticF1, also returning the judge's verdict (key ideas, precision, recall)."""

    def __init__(self):
        super().__init__(decompositional=True)

    def forward(self, example, pred, trace=None):
        verdict = self.module(question=example.question, ground_truth=example.response,
                              system_response=pred.response)
        score = f1_score(verdict.precision, verdict.recall)
        return dspy.Prediction(score=score if trace is None else score >= self.threshold, verdict=verdict)


def aligned_state(uri: str) -> str:
    """A local copy of an aligned judge's state: a path, or an MLflow artifact URI (`runs:/<id>/judge/...`)."""
    from pathlib import Path

    if Path(uri).is_file():
        return uri
    import mlflow

    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=uri)
    except Exception as e:
        raise ConfigError(f"scoring.judge={uri}: no aligned judge there ({' '.join(str(e).split())[:160]})") from None


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
    """

    def __init__(self, judge_lm: dspy.LM | None = None, traced: bool = False, aligned: str | None = None,
                 version: str | None = None):
        self.judge_lm = judge_lm
        self.traced = traced
        self.metric = SemanticF1()
        if aligned:  # an aligned judge's instructions and demos (pipelines/judging/align.py)
            self.metric.load(aligned_state(aligned))
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


# ---------------------------------------------------------------------------------------------
# Scoring a program


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
    def with_judges(cls, scoring: Scoring, judge_lm: dspy.LM | None, traced: bool = False) -> Scorer:
        """A scorer with the judges its metrics need, on `judge_lm`; SemanticF1 aligned where `scoring.judge`
        names an aligned judge."""
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


@dataclass
class EvalResult:
    rows: list[dict]
    estimates: dict[str, Estimate]  # per metric: mean over the examples scored on it (0-100), its interval, n
    primary: str
    judge_failures: int = 0
    judge: str | None = None  # the judge LM, source of the semantic_f1 assessments
    unscored: tuple[str, ...] = ()  # configured metrics no example was scored on (the judge never gave a verdict)

    @classmethod
    def from_rows(cls, rows: list[dict], scoring: Scoring, judge_failures: int = 0,
                  judge: str | None = None) -> EvalResult:
        recalls = sorted({k for r in rows for k in r if is_recall(k) and not k.endswith("_rationale")})
        names = [m for m in (*scoring.metrics, *recalls) if any(r.get(m) is not None for r in rows)]
        estimates = {m: scoring.interval([r[m] for r in rows if r.get(m) is not None]) for m in names}
        return cls(rows=rows, estimates=estimates, primary=scoring.primary, judge_failures=judge_failures,
                   judge=judge, unscored=tuple(m for m in scoring.metrics
                                               if m not in estimates and any(m in r for r in rows)))

    @property
    def score(self) -> float | None:
        """The primary metric's mean; None when no example was scored on it."""
        estimate = self.estimates.get(self.primary)
        return None if estimate is None else estimate.value

    @property
    def num_examples(self) -> int:
        return len(self.rows)

    @property
    def failed(self) -> int:
        return sum(1 for r in self.rows if r.get("error"))

    @property
    def failure_counts(self) -> dict[str, int]:
        return failure_counts(self.rows)

    @property
    def usage(self) -> dict[str, float | None]:
        """LM calls, tokens and cost per question (`analysis.usage_means`)."""
        return usage_means(self.rows)

    def headline(self) -> str:
        """`SemanticF1 = 46.3 ± 18.2 (95% CI, n=6)`, with how many examples the judge left unscored, or
        that it scored none."""
        return f"{label(self.primary)}{': ' if self.score is None else ' = '}{self.describe(self.primary)}"

    def describe(self, metric: str) -> str:
        """One metric's `46.3 ± 18.2 (95% CI, n=6)`, saying how many examples the judge left unscored."""
        estimate = self.estimates.get(metric)
        if estimate is None:
            return self.no_example_scored()
        unscored = self.num_examples - estimate.n
        return estimate.describe() + (f", {unscored} of {self.num_examples} examples unscored (no judge verdict)"
                                      if unscored and not is_recall(metric) else "")

    def no_example_scored(self) -> str:
        # A failed example scores 0 in every metric, so a metric is unscored only when no answer got a verdict.
        return f"no example scored: the judge gave no verdict on any of the {self.num_examples} examples"

    def summary(self) -> str:
        """Every metric, primary first, with its n where it is not every example:
        `SemanticF1 = 90.0 ± 3.1 (n=3), token F1 = 20.5 ± 2.0 (95% CI, n=6)`."""
        names = [self.primary, *(m for m in (*self.estimates, *self.unscored) if m != self.primary)]
        parts = []
        for m in names:
            estimate = self.estimates.get(m)
            if estimate is None:
                parts.append(f"{label(m)}: no example scored")
            else:
                parts.append(f"{label(m)} = {estimate}" + (f" (n={estimate.n})" if estimate.n != self.num_examples
                                                           else ""))
        spread = next((e for e in self.estimates.values() if e.half_width is not None), None)
        first = next(iter(self.estimates.values()), None)
        tail = (f"{spread.confidence:.0%} CI, n={self.num_examples}" if spread else
                first.no_interval_reason if first else f"n={self.num_examples}")
        return f"{', '.join(parts)} ({tail})"


def evaluate(program, examples: list[dspy.Example], scorer: Scorer, num_threads: int, progress: bool = True,
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
    rows = [result_row(ex, pred, collector.scored.get(id(ex)), scorer.scoring, retrieves,
                       metered_program.usage.get(_inputs_key(ex.inputs())))
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


def result_row(example, prediction, scored: Scored | None, scoring: Scoring, retrieves: bool,
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


def paired_scores(new_rows: list[dict], old_rows: list[dict], metric: str) -> tuple[list[float], list[float]]:
    """One metric's per-example scores of two result tables, paired by question: only the questions scored on
    both sides, so both means are over the same examples."""
    old = {r["question"]: r.get(metric) for r in old_rows}
    pairs = [(r[metric], old[r["question"]]) for r in new_rows
             if r.get(metric) is not None and old.get(r["question"]) is not None]
    return [n for n, _ in pairs], [o for _, o in pairs]


def compare(new: EvalResult, old: EvalResult, scoring: Scoring) -> dict[str, Comparison]:
    """new - old on every metric both have, over the examples both scored (the difference's n)."""
    comparisons = {}
    for metric in new.estimates:
        if metric in old.estimates:
            a, b = paired_scores(new.rows, old.rows, metric)
            if a:
                comparisons[metric] = scoring.paired(a, b)
    return comparisons
