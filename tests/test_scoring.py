"""Evaluation rows and failure accounting, against a fake OpenAI-compatible server."""

import time

import dspy
import mlflow
import pytest

from fake_lm import FakeLM
from pipelines.config import compose
from pipelines.data import load_splits
from pipelines.lm import build_adapter, build_lm
from pipelines.scoring import JudgedF1, evaluate, recall_at_k


def fake_session(fake: FakeLM):
    cfg = compose("cot", ["lm=openai", f"lm.api_base={fake.api_base}", "lm.api_key_env=null",
                          f"lm.model=openai/fake-{fake.mode}", "lm.cache=false", "lm.adapter=json_schema",
                          "lm.num_retries=0"])
    return build_lm(cfg.lm), build_adapter(cfg.lm), load_splits(cfg.data).dev[:3]


def test_recall_at_k():
    assert recall_at_k([1, 2, 3], [3, 9]) == 0.5
    assert recall_at_k([1], None) is None


def test_good_answers_make_full_rows():
    with FakeLM(mode="ok") as fake:
        lm, adapter, dev = fake_session(fake)
        with dspy.context(lm=lm, adapter=adapter):
            result = evaluate(dspy.ChainOfThought("question -> response"), dev, JudgedF1(lm), num_threads=2,
                              progress=False)
    assert result.failed == 0 and result.judge_failures == 0
    assert result.score == pytest.approx(50.0)  # the fake judge says recall = precision = 0.5
    row = result.rows[0]
    assert row["question"] == dev[0].question and row["gold"] == dev[0].response
    assert row["prediction"] == "fake response" and row["reasoning"] == "fake reasoning"


@pytest.mark.parametrize("mode", ["garbage", "empty"])
def test_unparsable_or_empty_output_counts_as_failure_and_run_completes(mode):
    with FakeLM(mode=mode) as fake:
        lm, adapter, dev = fake_session(fake)
        with dspy.context(lm=lm, adapter=adapter):
            result = evaluate(dspy.ChainOfThought("question -> response"), dev, JudgedF1(lm), num_threads=2,
                              progress=False)
    assert result.num_examples == 3 and result.failed == 3 and result.score == 0.0
    assert all(r["error"] for r in result.rows)


@pytest.mark.parametrize("trace_judge", [False, True])
def test_judge_calls_are_traced_only_when_asked(store, trace_judge):
    import mlflow

    cfg = compose("cot", ["lm=openai", "lm.api_key_env=null", f"tracking.trace_judge={trace_judge}",
                          f"tracking.artifact_location={store}/artifacts"])
    from pipelines import tracking

    tracking.setup(cfg)
    answer = {"reasoning": "r", "response": "ok"}
    verdict = {"reasoning": "r", "ground_truth_key_ideas": "a", "system_response_key_ideas": "a",
               "discussion": "d", "recall": 1.0, "precision": 1.0}
    lm = dspy.utils.DummyLM([answer, verdict] * 2)  # one thread: program, judge, program, judge
    dev = load_splits(cfg.data).dev[:2]
    with tracking.run("traces", cfg) as active, dspy.context(lm=lm):
        result = evaluate(dspy.ChainOfThought("question -> response"), dev, JudgedF1(lm, traced=trace_judge),
                          num_threads=1, progress=False)
    assert result.score == 100.0
    traces = mlflow.search_traces(locations=[active.info.experiment_id], return_type="list")
    roots = sorted(t.data.spans[0].name for t in traces)
    assert roots.count("ChainOfThought.forward") == 2
    assert roots.count("SemanticF1.forward") == (2 if trace_judge else 0)


def traced_evaluation(store, n: int, threads: int):
    """`n` cot examples at `threads` threads through the project's scoring step, traced."""
    from pipelines import tracking
    from pipelines.steps import prepare, _score

    fake = FakeLM().start()
    cfg = compose("cot", ["lm=openai", f"lm.api_base={fake.api_base}", "lm.api_key_env=null", "lm.model=openai/fake",
                          "lm.cache=false", "lm.adapter=json_schema", f"num_threads={threads}",
                          f"tracking.artifact_location={store}/artifacts"])
    session = prepare(cfg)
    examples = (session.splits.train + session.splits.dev + session.splits.test)[:n]
    try:
        with tracking.run("traced", cfg) as active:
            _score(session, dspy.ChainOfThought("question -> response"), examples, "", "dev")
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
    started = time.monotonic()
    run = traced_evaluation(store, n=24, threads=24)
    assert run.data.metrics["traces_logged"] == 24 and "traces_missing" not in run.data.tags
    assert time.monotonic() - started < 25  # no wait on the pool's 30 s timeout


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
