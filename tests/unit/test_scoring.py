"""Metrics per example, evaluation rows and trace assessments, against DSPy's DummyLM."""

import dspy
import mlflow
import pytest
from dspy.utils import DummyLM
from hydra.errors import ConfigCompositionException

from pipelines import tracking
from pipelines.config import ConfigError, compose
from pipelines.data import load_splits
from pipelines.evaluation.scoring import JudgedF1, Scorer, Scoring, evaluate, rouge_l, token_f1
from pipelines.programs import RAG

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
                          num_threads=1, progress=False, trace_id=tracking.last_trace_id)
        tracking.log_evaluation(result, split="dev")
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
                          trace_id=tracking.last_trace_id)
        tracking.log_evaluation(result, split="dev")
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
