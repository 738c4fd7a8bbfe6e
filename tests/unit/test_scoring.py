"""Metrics per example, evaluation rows and trace assessments, against DSPy's DummyLM."""

import dataclasses

import dspy
import mlflow
import pytest
from dspy.utils import DummyLM
from hydra.errors import ConfigCompositionException

from pipelines import tracking
from pipelines.config import compose
from pipelines.data import load_splits
from pipelines.errors import ConfigError
from pipelines.evaluation.judge import JudgedF1
from pipelines.evaluation.metrics import rouge_l, token_f1
from pipelines.evaluation.scoring import Scorer, Scoring, evaluate
from pipelines.programs import RAG
from pipelines.tracking.evaluation import log_evaluation
from pipelines.tracking.traces import last_trace_id

from helpers import FixedRetriever

METRICS = ["semantic_f1", "token_f1", "rouge_l"]


def scorer_for(lm, *overrides, traced=False):
    cfg = compose("cot", ["scoring.primary=semantic_f1", *overrides])
    return Scorer(Scoring.from_cfg(cfg.scoring), JudgedF1(lm, traced=traced))


@pytest.mark.parametrize("prediction, gold, expected", [
    ("use git reset", "use git reset", 100.0),
    ("completely unrelated words", "use git reset", 0.0),
    ("The answer: git reset!", "git reset --soft HEAD~1", 2 * (2 / 3) * (2 / 4) / ((2 / 3) + (2 / 4)) * 100),
    # "-" is dropped, not split on: "gitreset" matches nothing; "soft" and "one" are 2 of 3 and 2 of 4 tokens.
    ("A Git-Reset, the soft one.", "git reset soft one", 2 * (2 / 3) * (2 / 4) / ((2 / 3) + (2 / 4)) * 100),
    ("An apple, the Pear!", "apple pear", 100.0),  # case, punctuation and articles do not count
    ("", "use git reset", 0.0),
])
def test_token_f1_on_hand_made_pairs(prediction, gold, expected):
    assert token_f1(prediction, gold) == pytest.approx(expected, abs=1e-4)


def test_rouge_l_on_hand_made_pairs():
    assert rouge_l("use git reset", "use git reset") == 100.0
    assert rouge_l("nothing in common", "use git reset") == 0.0
    # Longest common subsequence "cat sat on mat": 4 of 6 tokens on each side.
    assert rouge_l("the cat sat on the mat", "a cat sat on a mat") == pytest.approx(200 / 3, abs=1e-4)


def test_scoring_config_is_checked():
    # The embedded LM judging itself is noise: on lm=local a judge-free metric decides; elsewhere the judge.
    assert Scoring.from_cfg(compose("cot").scoring).primary == "token_f1"
    assert Scoring.from_cfg(compose("cot", ["lm=openai"]).scoring).primary == "semantic_f1"
    assert Scoring.from_cfg(compose("cot", ["scoring.primary=semantic_f1"]).scoring).primary == "semantic_f1"
    assert "semantic_f1" not in Scoring.from_cfg(compose("cot").scoring).metrics  # no judge call is paid for
    assert Scoring.from_cfg(compose("cot", ["scoring.primary=semantic_f1"]).scoring).metrics == (
        "token_f1", "rouge_l", "semantic_f1")  # the primary metric is always scored
    assert Scoring.from_cfg(compose("cot", ["scoring.metrics=[]"]).scoring).metrics == ("token_f1",)
    with pytest.raises(ConfigError, match="scoring.confidence"):
        Scoring.from_cfg(compose("cot", ["scoring.confidence=1.5"]).scoring)
    for unknown in ("scoring.metrics=[bleu]", "scoring.promotion=sometimes"):  # the schema's types refuse these
        with pytest.raises(ConfigCompositionException) as error:
            compose("cot", [unknown])
        assert "expected one of" in str(error.value.__cause__)


def test_recall_counts_gold_documents_among_the_retrieved():
    scorer = Scorer(Scoring.from_cfg(compose("rag", ["scoring.metrics=[token_f1]",
                                                     "scoring.primary=token_f1"]).scoring))
    example = dspy.Example(question="q", response="r", gold_doc_ids=[3, 9]).with_inputs("question")
    scored = scorer.score(example, dspy.Prediction(response="r", doc_ids=[1, 2, 3]), ("token_f1", "recall_at_k"))
    assert scored.values == {"token_f1": 100.0, "recall_at_k": 50.0}
    assert scored.rationales["recall_at_k"] == "1 of 2 gold documents retrieved"
    no_gold = dspy.Example(question="q", response="r").with_inputs("question")
    assert "recall_at_k" not in scorer.score(no_gold, dspy.Prediction(response="r", doc_ids=[1]),
                                             ("recall_at_k",)).values


def traced_session(store, program_name="cot", *overrides):
    cfg = compose(program_name, ["lm=openai", "lm.api_key_env=null", f"tracking.artifact_location={store}/artifacts",
                                 *overrides])
    tracking.setup(cfg)
    return cfg


@pytest.mark.parametrize("trace_judge", [False, True])
def test_judge_calls_are_traced_only_when_asked(store, trace_judge):
    cfg = traced_session(store, "cot", f"tracking.trace_judge={trace_judge}")
    answer = {"reasoning": "r", "response": "ok"}
    verdict = {"reasoning": "r", "ground_truth_key_ideas": "a", "system_response_key_ideas": "a",
               "discussion": "d", "recall": 1.0, "precision": 1.0}
    lm = DummyLM([answer, verdict] * 2)  # one thread: program, judge, program, judge
    dev = load_splits(cfg.data).dev[:2]
    with tracking.run("traces", cfg) as active, dspy.context(lm=lm):
        result = evaluate(dspy.ChainOfThought("question -> response"), dev, scorer_for(lm, traced=trace_judge),
                          num_threads=1, progress=False, trace_id=last_trace_id)
        log_evaluation(result, split="dev")
    assert result.score == 100.0
    traces = mlflow.search_traces(locations=[active.info.experiment_id], return_type="list")
    roots = {t.info.trace_id: t.data.spans[0].name for t in traces}
    assert sorted(roots.values()).count("ChainOfThought.forward") == 2
    assert sorted(roots.values()).count("SemanticF1.forward") == (2 if trace_judge else 0)
    # Metrics land on the program's traces, never on the judge's own.
    assert {r["trace_id"] for r in result.rows} == {i for i, name in roots.items() if name == "ChainOfThought.forward"}


def test_traces_carry_one_clean_assessment_per_metric(store):
    cfg = traced_session(store, "rag")
    answer = {"reasoning": "r", "response": "Use git reset."}
    verdict = {"reasoning": "r", "ground_truth_key_ideas": "reset the branch", "system_response_key_ideas": "reset",
               "discussion": "d", "recall": 1.0, "precision": 0.5}
    lm = DummyLM([answer, verdict] * 2)
    examples = [dspy.Example(question=f"undo commit {i}?", response="use git reset", gold_doc_ids=[0, 7])
                .with_inputs("question") for i in range(2)]
    program = RAG(FixedRetriever(["p1", "p2", "p3"]), k=2)  # retrieves doc ids 0 and 1
    with tracking.run("traces", cfg) as active, dspy.context(lm=lm):
        result = evaluate(program, examples, scorer_for(lm), num_threads=1, progress=False,
                          trace_id=last_trace_id)
        log_evaluation(result, split="dev")
    traces = mlflow.search_traces(locations=[active.info.experiment_id], return_type="list")
    assert len(traces) == 2
    expected = {"semantic_f1": 2 * 0.5 * 1.0 / 1.5 * 100, "token_f1": 100.0, "rouge_l": 100.0, "recall_at_k": 50.0}
    for trace in traces:
        assessments = {a.name: a for a in trace.info.assessments}
        assert sorted(a.name for a in trace.info.assessments) == sorted(expected)  # one each, no 0-1 duplicate
        for name, value in expected.items():
            assert assessments[name].value == pytest.approx(value, abs=1e-4)
            assert assessments[name].value == round(assessments[name].value, 4)
        judge = assessments["semantic_f1"]
        assert judge.source.source_type == "LLM_JUDGE" and assessments["token_f1"].source.source_type == "CODE"
        assert "precision 0.50, recall 1.00" in judge.rationale and "reset the branch" in judge.rationale
        assert assessments["recall_at_k"].rationale == "1 of 2 gold documents retrieved"
    assert {r["trace_id"] for r in result.rows} == {t.info.trace_id for t in traces}
    run = mlflow.get_run(active.info.run_id)
    assert run.data.metrics["recall_at_k"] == 50.0 and run.data.metrics["recall_at_k_ci_low"] == 50.0
    assert run.data.metrics["token_f1_ci_high"] == 100.0


VERDICT = {"reasoning": "r", "ground_truth_key_ideas": "reset", "system_response_key_ideas": "reset",
           "discussion": "d", "recall": 0.9, "precision": 0.9}


def half_judged(n: int = 4):
    """`n` questions whose program answers name them; the judge's verdict parses on the even ones (F1 0.9) and
    not on the odd ones (no precision or recall). Keyed by text, so the order of the calls does not matter."""
    questions = [f"how do I undo commit {i}?" for i in range(n)]
    judge = {f"reset number {i}": VERDICT if i % 2 == 0 else {"reasoning": "I cannot tell"} for i in range(n)}
    program = {q: {"reasoning": "r", "response": f"reset number {i}"} for i, q in enumerate(questions)}
    dev = [dspy.Example(question=q, response="git reset").with_inputs("question") for q in questions]
    return DummyLM({**judge, **program}), dev  # the judge's keys first: its prompt holds the question too


def test_a_verdict_the_judge_cannot_give_is_missing_not_a_zero():
    lm, dev = half_judged()
    scorer = scorer_for(lm, "scoring.metrics=[semantic_f1,token_f1]")
    with dspy.context(lm=lm):
        result = evaluate(dspy.ChainOfThought("question -> response"), dev, scorer, num_threads=2, progress=False)
        optimizer_sees = [scorer(ex, dspy.Prediction(response=f"reset number {i}")) for i, ex in enumerate(dev)]
    assert result.judge_failures == 2 and result.failed == 0
    estimate = result.estimates["semantic_f1"]
    assert estimate.value == 90.0 and estimate.n == 2  # over the two scored answers: not 45 over four
    assert result.estimates["token_f1"].n == 4 and all(r["token_f1"] == 40.0 for r in result.rows)
    rows = {r["question"]: r for r in result.rows}
    for i, ex in enumerate(dev):
        row = rows[ex.question]
        if i % 2:
            assert row["semantic_f1"] is None and row["failure_mode"] == "judge_failed"
            assert row["semantic_f1_rationale"].startswith("the judge failed")
        else:
            assert row["semantic_f1"] == 90.0 and row["failure_mode"] == "ok"
    assert result.failure_counts["judge_failed"] == 2 and result.failure_counts["ok"] == 2
    assert result.summary().startswith("SemanticF1 = 90.0 ± 0.0 (n=2), token F1 = ")
    assert result.headline() == "SemanticF1 = 90.0 ± 0.0 (95% CI, n=2), 2 of 4 examples unscored (no judge verdict)"
    # The optimizer's own search needs a number: there an unscored answer counts 0.
    assert optimizer_sees == [0.9, 0.0, 0.9, 0.0]


def test_a_judge_that_never_gives_a_verdict_leaves_the_metric_unscored_never_zero(store):
    cfg = traced_session(store, "cot", "scoring.primary=semantic_f1", "scoring.metrics=[token_f1]")
    lm, dev = half_judged(2)
    lm.answers = {k: v for k, v in lm.answers.items() if k != "reset number 0"}  # now no verdict parses
    scorer = Scorer(Scoring.from_cfg(cfg.scoring), JudgedF1(lm))
    with tracking.run("unscored", cfg) as active, dspy.context(lm=lm):
        result = evaluate(dspy.ChainOfThought("question -> response"), dev, scorer, num_threads=1, progress=False,
                          trace_id=last_trace_id)
        log_evaluation(result, split="dev")
    assert result.score is None and result.unscored == ("semantic_f1",) and result.judge_failures == 2
    assert result.headline() == "SemanticF1: no example scored: the judge gave no verdict on any of the 2 examples"
    assert result.summary().startswith("SemanticF1: no example scored, token F1 = ")
    run = mlflow.get_run(active.info.run_id).data
    assert not [k for k in run.metrics if k.startswith("semantic_f1")]  # no 0, no interval, nothing
    assert run.tags["semantic_f1"] == ("not computed: no example scored: the judge gave no verdict on any of the 2 "
                                       "examples")
    assert run.metrics["judge_failures"] == 2 and run.metrics["failure_judge_failed"] == 2
    assert run.metrics["token_f1"] >= 0 and "token_f1_n" not in run.metrics
    traces = mlflow.search_traces(locations=[active.info.experiment_id], return_type="list")
    assert len(traces) == 2
    for trace in traces:  # each says what happened: no verdict (the judge's error), not a 0
        assert trace.info.tags["failure_mode"] == "judge_failed"
        judged = {a.name: a for a in trace.info.assessments}["semantic_f1"]
        assert judged.value is None and judged.error.error_code == "JUDGE_FAILED"
        assert judged.error.error_message.startswith("the judge failed")


def test_any_judged_metric_without_a_value_is_missing_as_semantic_f1_is():
    """A pairwise judge whose outcome has no value (an arena verdict that did not parse) on the odd questions:
    the arena rates are over the even ones, and as primary the odd examples are `judge_failed`."""

    @dataclasses.dataclass(frozen=True)
    class Outcome:  # as the arena judge's, whose failure has no value
        judged: bool
        rationale: str

        def value(self, metric):
            return 100.0 if self.judged else None

    class HalfArena:
        lm, failures = None, 0

        def __call__(self, example, prediction):
            judged = int(example.question[-1]) % 2 == 0
            self.failures += not judged
            return Outcome(judged, "program's answer won" if judged else "the judge failed")

    cfg = compose("cot", ["scoring.metrics=[token_f1,arena_win_rate]", "scoring.primary=arena_win_rate"])
    dev = [dspy.Example(question=f"question {i}", response="git reset").with_inputs("question") for i in range(4)]
    result = evaluate(lambda question: dspy.Prediction(response="git reset"), dev,
                      Scorer(Scoring.from_cfg(cfg.scoring), pairwise=HalfArena()), num_threads=1, progress=False)
    estimate = result.estimates["arena_win_rate"]
    assert estimate.value == 100.0 and estimate.n == 2 and result.estimates["token_f1"].n == 4
    assert [r["failure_mode"] for r in result.rows] == ["ok", "judge_failed", "ok", "judge_failed"]
    assert result.judge_failures == 2 and result.rows[1]["arena_win_rate_rationale"] == "the judge failed"
