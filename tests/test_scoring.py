"""Metrics per example, evaluation rows, failure accounting and trace assessments, against fake LMs."""

import time

import dspy
import mlflow
import pytest
from dspy.utils import DummyLM

from pipelines import tracking
from pipelines.config import ConfigError, compose
from pipelines.data import load_splits
from pipelines.lm import build_adapter, build_lm
from pipelines.programs import RAG
from pipelines.scoring import JudgedF1, Scorer, Scoring, evaluate, rouge_l, token_f1

from fake_lm import FakeLM
from helpers import FixedRetriever, fake_lm_overrides

METRICS = ["semantic_f1", "token_f1", "rouge_l"]


def scorer_for(lm, *overrides, traced=False):
    return Scorer(Scoring.from_cfg(compose("cot", list(overrides)).scoring), JudgedF1(lm, traced=traced))


def fake_session(fake: FakeLM):
    cfg = compose("cot", fake_lm_overrides(fake.api_base, model=f"openai/fake-{fake.mode}"))
    return build_lm(cfg.lm), build_adapter(cfg.lm), load_splits(cfg.data).dev[:3]


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
    assert Scoring.from_cfg(compose("cot").scoring).primary == "semantic_f1"
    for bad in (["scoring.primary=rouge_l", "scoring.metrics=[token_f1]"], ["scoring.metrics=[bleu]"],
                ["scoring.promotion=sometimes"]):
        with pytest.raises(ConfigError, match="scoring"):
            Scoring.from_cfg(compose("cot", bad).scoring)


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


def test_good_answers_make_full_rows_on_the_0_100_scale():
    with FakeLM(mode="ok") as fake:
        lm, adapter, dev = fake_session(fake)
        with dspy.context(lm=lm, adapter=adapter):
            result = evaluate(dspy.ChainOfThought("question -> response"), dev, scorer_for(lm), num_threads=2,
                              progress=False)
    assert result.failed == 0 and result.judge_failures == 0
    assert result.score == pytest.approx(50.0)  # the fake judge says recall = precision = 0.5
    assert list(result.estimates) == METRICS
    row = result.rows[0]
    assert row["question"] == dev[0].question and row["gold"] == dev[0].response
    assert row["prediction"] == "fake response" and row["reasoning"] == "fake reasoning"
    assert row["semantic_f1"] == 50.0 and "precision 0.50, recall 0.50" in row["semantic_f1_rationale"]
    assert row["token_f1"] == token_f1("fake response", dev[0].response)
    assert "score" not in row and row["trace_id"] is None  # not traced: no trace id to attach metrics to
    assert result.estimates["semantic_f1"].half_width == 0.0  # every example judged alike


def test_lexical_metrics_are_identical_across_reruns():
    with FakeLM(mode="ok") as fake:
        lm, adapter, dev = fake_session(fake)
        runs = []
        for _ in range(2):
            with dspy.context(lm=lm, adapter=adapter):
                runs.append(evaluate(dspy.ChainOfThought("question -> response"), dev, scorer_for(lm),
                                     num_threads=2, progress=False))
    for metric in ("token_f1", "rouge_l"):
        assert [r[metric] for r in runs[0].rows] == [r[metric] for r in runs[1].rows]
        assert runs[0].estimates[metric] == runs[1].estimates[metric]


@pytest.mark.parametrize("mode", ["garbage", "empty"])
def test_unparsable_or_empty_output_counts_as_failure_and_zero_in_every_metric(mode):
    with FakeLM(mode=mode) as fake:
        lm, adapter, dev = fake_session(fake)
        with dspy.context(lm=lm, adapter=adapter):
            result = evaluate(dspy.ChainOfThought("question -> response"), dev, scorer_for(lm), num_threads=2,
                              progress=False)
    assert result.num_examples == 3 and result.failed == 3 and result.score == 0.0
    assert all(r["error"] for r in result.rows)
    assert all(r[m] == 0.0 for r in result.rows for m in METRICS)
    assert all(result.estimates[m].value == 0.0 for m in METRICS)
    assert fake.calls == 3  # the program's calls only: a failed answer is not sent to the judge


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
        tracking.log_evaluation(result, "dev")
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
        tracking.log_evaluation(result, "dev")
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


def traced_evaluation(store, n: int, threads: int):
    """`n` cot examples at `threads` threads through the project's scoring step, traced."""
    from pipelines import tracking
    from pipelines.steps import _score, prepare

    fake = FakeLM().start()
    cfg = compose("cot", [*fake_lm_overrides(fake.api_base, threads=threads),
                          f"tracking.artifact_location={store}/artifacts"])
    session = prepare(cfg)
    examples = (session.splits.train + session.splits.dev + session.splits.test)[:n]
    try:
        with tracking.run("traced", cfg) as active:
            _score(session, dspy.ChainOfThought("question -> response"), examples, "", "dev", model=None)
    finally:
        fake.stop()
    return mlflow.get_run(active.info.run_id)


def test_every_example_of_a_many_threaded_evaluation_is_traced(store, monkeypatch):
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    # A slow store lines the 24 threads' exports up, each holding a pooled connection while it
    # asks for a second (as on a loaded host): with MLflow's default pool of 5 + 10 they starve.
    original = SqlAlchemyStore.get_experiment

    def slow_get_experiment(self, experiment_id):
        time.sleep(0.3)
        return original(self, experiment_id)

    monkeypatch.setattr(SqlAlchemyStore, "get_experiment", slow_get_experiment)
    run = traced_evaluation(store, n=24, threads=24)  # starved exports time out after 30 s and are lost
    assert run.data.metrics["traces_logged"] == 24 and "traces_missing" not in run.data.tags


def test_traces_the_store_refuses_are_counted_and_explained(store, monkeypatch, caplog):
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    original, calls = SqlAlchemyStore.start_trace, []

    def every_third_fails(self, trace_info):
        calls.append(trace_info)
        if len(calls) % 3 == 0:
            raise mlflow.exceptions.MlflowException("disk quota exceeded")
        return original(self, trace_info)

    monkeypatch.setattr(SqlAlchemyStore, "start_trace", every_third_fails)
    with caplog.at_level("WARNING", logger="pipelines.tracking"):
        run = traced_evaluation(store, n=6, threads=1)
    assert run.data.metrics["traces_logged"] == 4
    assert "2 of 6 traces were not written" in run.data.tags["traces_missing"]
    assert "disk quota exceeded" in run.data.tags["traces_missing"] and "disk quota exceeded" in caplog.text
