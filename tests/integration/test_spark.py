"""Spark, the real engine, against the fake LM server: `predict` through `mlflow run` on local Spark,
evaluation and corpus embedding on executors matching the local engine, and a standalone cluster on
loopback (master + 2 workers) that loses an executor mid-job and still answers every row once."""

import json
import signal
import sys
import threading
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from pipelines.config import compose
from pipelines.data import load_corpus
from pipelines.retrieval.cache import embed_all
from pipelines.retrieval.embedders import build_embedder
from pipelines.scale.engine import embed_on_spark
from pipelines.scale.spark import session
from pipelines.steps.evaluate import run_evaluate
from pipelines.steps.predict import run_predict
from pipelines.steps.variant import run_variant

from fake_lm import fake_model
from helpers import (
    FAKE_KEY,
    ROOT,
    fake_lm_overrides,
    fake_overrides,
    mlflow_run,
    run_cli,
    smoke,
    spark_cluster,
    spark_executors,
    tracking_server,
)


def questions(path, n: int, empty_at: int | None = None):
    rows = [{"id": 1000 + i, "question": "" if i == empty_at else f"how do I fix problem number {i}?"}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def predict_run():
    (run,) = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
              if r.data.tags.get("step") == "predict"]
    return run


def test_predict_on_local_spark_answers_every_question_with_its_id_and_no_key_leaks(store, fake, tmp_path,
                                                                                    monkeypatch):
    env = {"OPENAI_API_KEY": FAKE_KEY}  # the program reads its key from the environment only
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    logged = run_variant(smoke("cot", store, *fake_overrides(fake), "lm.api_key_env=OPENAI_API_KEY"))
    events, output = tmp_path / "events", tmp_path / "predictions"
    events.mkdir()
    overrides = (f"tracking.artifact_location={store}/artifacts +spark.conf.eventLog.enabled=true "
                 f"+spark.conf.eventLog.dir={events.as_uri()} +spark.conf.eventLog.compress=false")
    proc = mlflow_run("predict", store, overrides, env=env, extra=[
        "-P", f"model_uri=models:/ragqa-tech-smoke/{logged.version}",
        "-P", f"input={questions(tmp_path / 'questions.jsonl', 50, empty_at=7)}", "-P", f"output={output}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    answers = pd.read_parquet(output)
    assert list(answers["id"]) == list(range(1000, 1050))  # every row, in input order, ids through
    assert set(answers.columns) == {"id", "question", "reasoning", "response", "error", "trace_id"}
    assert (answers["trace_id"] == "").all()  # a local store: executors do not trace
    assert answers.loc[7, "error"] == "empty question" and answers.loc[7, "response"] == ""
    assert (answers.drop(index=7)["response"] == "fake response").all() and (answers.drop(index=7)["error"] == "").all()
    run = predict_run()
    assert run.info.status == "FINISHED" and run.info.run_name == "predict"
    assert run.data.metrics["rows"] == 50 and run.data.metrics["failed_rows"] == 1
    assert run.data.metrics["rows_per_second"] > 0 and run.data.metrics["executors"] >= 1
    assert run.data.tags["output"] == str(output)
    assert run.data.tags["model_version"] == f"ragqa-tech-smoke/{logged.version}"
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "questions.jsonl" and dataset.dataset.source_type == "spark"
    sample = mlflow.load_table("predictions/sample.json", run_ids=[run.info.run_id])
    assert len(sample) == 20 and list(sample["id"]) == list(range(1000, 1020))
    assert list(events.iterdir()), "the Spark event log was not written"
    for place in (output, store, events):
        assert [p for p in place.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()] == []
    assert FAKE_KEY not in proc.stdout + proc.stderr


def test_evaluation_and_embedding_on_spark_match_the_local_engine(store, fake):
    from pipelines.judging.align import JudgeProgram

    state = store / "aligned.json"  # an aligned judge's state: Spark ships executors a copy of the file
    JudgeProgram().judge.save(str(state))
    base = [*fake_overrides(fake), "data.dev_size=12", "data.test_size=3", f"scoring.judge={state}"]
    local = run_variant(smoke("rag", store, *base))
    on_spark = run_variant(smoke("rag", store, *base, "engine=spark", "index.engine=spark",
                                 "tracking.registered_model=spark-engine", f"paths.cache={store}/spark-cache"))
    without_traces = [{k: v for k, v in r.items() if k != "trace_id"} for r in local.result.rows]
    assert [{k: v for k, v in r.items() if k != "trace_id"} for r in on_spark.result.rows] == without_traces
    assert on_spark.result.estimates == local.result.estimates and local.result.num_examples == 12
    runs = {r.info.run_id: r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")}
    assert runs[on_spark.run_id].data.tags["index.cache"] == "built"  # embedded on Spark, not read from cache
    for key in ("semantic_f1", "token_f1", "recall_at_k", "semantic_f1_ci_low", "recall_at_k_ci_high"):
        assert runs[on_spark.run_id].data.metrics[key] == runs[local.run_id].data.metrics[key]

    cfg = smoke("rag", store, *base)
    corpus = load_corpus(cfg.data)
    embedder = build_embedder(cfg.embedder)
    from pipelines.packaging import embedder_spec

    spread = embed_on_spark(session(cfg), corpus.texts, embedder_spec(embedder), partitions=3)
    assert np.array_equal(spread, embed_all(embedder, corpus.texts, batch_size=64))


def test_multihop_and_an_ensemble_evaluate_and_predict_on_spark(store, fake, tmp_path):
    base = [*fake_overrides(fake), "data.dev_size=6", "scoring.metrics=[token_f1]", "scoring.primary=token_f1"]
    multihop = run_variant(smoke("multihop", store, *base))
    on_spark = run_variant(smoke("multihop", store, *base, "engine=spark", "tracking.registered_model=spark-engine"))
    without_traces = [{k: v for k, v in r.items() if k != "trace_id"} for r in multihop.result.rows]
    assert [{k: v for k, v in r.items() if k != "trace_id"} for r in on_spark.result.rows] == without_traces
    assert on_spark.result.estimates == multihop.result.estimates and "recall_at_k_hop2" in multihop.result.estimates

    rag = run_variant(smoke("rag", store, *base))
    members = f"[models:/ragqa-tech-smoke/{multihop.version},models:/ragqa-tech-smoke/{rag.version}," \
              f"models:/ragqa-tech-smoke/{rag.version}]"  # mbr needs 3 to choose
    ensemble = run_variant(smoke("ensemble", store, *base, f"ensemble.members={members}"))
    source = questions(tmp_path / "questions.jsonl", 12, empty_at=3)
    for logged, outputs in ((multihop, {"context", "doc_ids", "queries"}),
                            (ensemble, {"context", "doc_ids", "candidates"})):
        output = tmp_path / f"out-{logged.name}"
        run_predict(compose("predict", [f"model_uri=models:/ragqa-tech-smoke/{logged.version}", f"input={source}",
                                        f"output={output}", f"tracking.artifact_location={store}/artifacts"]))
        answers = pd.read_parquet(output)
        assert list(answers["id"]) == list(range(1000, 1012))
        assert set(answers.columns) == {"id", "question", "reasoning", "response", "error", "trace_id", *outputs}
        assert answers.loc[3, "error"] == "empty question" and (answers.drop(index=3)["error"] == "").all()
        assert all(len(d) > 0 for d in answers.drop(index=3)["doc_ids"])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with spark_cluster(tmp_path_factory.mktemp("spark-cluster")) as master:
        yield master


def kill_an_executor_once(fake, after_calls: int) -> threading.Thread:
    """SIGKILL one executor JVM once the fake LM has answered `after_calls` times: the job is under way."""
    def kill():
        deadline = time.time() + 300
        while fake.calls < after_calls and time.time() < deadline:
            time.sleep(0.1)
        executors = spark_executors()
        if executors:
            executors[0].send_signal(signal.SIGKILL)
            killed.append(executors[0].pid)
    killed: list[int] = []
    thread = threading.Thread(target=kill, daemon=True)
    thread.killed = killed
    thread.start()
    return thread


def on_cluster(master: str) -> list[str]:
    return ["spark=standalone", f"spark.master={master}", "+spark.conf.driver.host=127.0.0.1",
            "+spark.conf.driver.bindAddress=127.0.0.1", "spark.partitions=8"]


def test_a_standalone_cluster_loses_an_executor_mid_job_and_answers_every_row_once(store, fake, tmp_path, cluster):
    slow = [*fake_lm_overrides(fake.api_base, model=fake_model(latency_ms=100)), "embedder=openai",
            f"embedder.api_base={fake.api_base}", "embedder.api_key_env=null"]
    logged = run_variant(smoke("cot", store, *slow))
    uri = f"models:/ragqa-tech-smoke/{logged.version}"
    env = {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "RAGQA_CACHE_DIR": str(store / "cache")}

    killer = kill_an_executor_once(fake.reset(), after_calls=40)
    output = tmp_path / "predictions"
    proc = run_cli([sys.executable, "-m", "pipelines.predict", f"model_uri={uri}",
                    f"input={questions(tmp_path / 'questions.jsonl', 200)}", f"output={output}", "num_threads=1",
                    f"tracking.artifact_location={store}/artifacts", *on_cluster(cluster)], cwd=ROOT, env=env)
    killer.join(timeout=1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert killer.killed, "no executor was killed: the job ended before it was under way"
    ids = pd.read_parquet(output)["id"]
    assert sorted(ids) == list(range(1000, 1200)) and ids.is_unique  # every row exactly once
    run = predict_run()
    assert run.info.status == "FINISHED" and run.data.metrics["rows"] == 200 and run.data.metrics["executors"] >= 2

    test_split = ["data.test_size=30", "split=test"]
    local = run_cli([sys.executable, "-m", "pipelines.evaluate", f"model_uri={uri}", *test_split, *slow,
                     f"tracking.artifact_location={store}/artifacts"], cwd=ROOT, env=env)
    assert local.returncode == 0, local.stderr[-4000:]
    killer = kill_an_executor_once(fake.reset(), after_calls=12)
    spread = run_cli([sys.executable, "-m", "pipelines.evaluate", f"model_uri={uri}", *test_split, *slow,
                      "engine=spark", f"tracking.artifact_location={store}/artifacts", *on_cluster(cluster)],
                     cwd=ROOT, env=env)
    killer.join(timeout=1)
    assert spread.returncode == 0, spread.stderr[-4000:]
    assert killer.killed
    evaluations = sorted((r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
                          if r.data.tags.get("step") == "evaluate-test"), key=lambda r: r.info.start_time)
    assert [r.data.params["engine"] for r in evaluations] == ["local", "spark"]
    first, second = (r.data.metrics for r in evaluations)
    assert second["num_examples"] == 30
    for key in ("test_semantic_f1", "test_token_f1", "test_rouge_l", "test_token_f1_ci_low", "failed_examples"):
        assert second[key] == first[key], key
    tables = [mlflow.load_table("eval/test_results.json", run_ids=[r.info.run_id]) for r in evaluations]
    assert tables[0]["question"].tolist() == tables[1]["question"].tolist()
    assert tables[0]["token_f1"].tolist() == tables[1]["token_f1"].tolist()


def test_with_a_tracking_server_executors_trace_predictions_and_evaluations(tmp_path, fake, monkeypatch):
    with tracking_server(tmp_path) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        cfg = compose("evaluate", ["experiment=smoke", *fake_overrides(fake), "data.test_size=4", "engine=spark"])
        logged = run_variant(compose("cot", ["experiment=smoke", *fake_overrides(fake)]))
        model_uri = f"models:/ragqa-tech-smoke/{logged.version}"
        run_predict(compose("predict", [f"model_uri={model_uri}", f"output={tmp_path / 'out'}",
                                        f"input={questions(tmp_path / 'questions.jsonl', 6)}"]))
        experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id
        predicted = [t for t in mlflow.search_traces(locations=[experiment], return_type="list")
                     if "how do I fix problem number" in str(t.data.request)]
        assert len(predicted) == 6  # one per question, written by the executors
        answered = pd.read_parquet(tmp_path / "out")  # each row names its trace, linked to the version
        assert set(answered["trace_id"]) == {t.info.trace_id for t in predicted}
        assert {t.info.request_metadata.get("mlflow.modelId") for t in predicted} == {
            mlflow.models.get_model_info(model_uri).model_id}

        evaluated = run_evaluate(OmegaConf.merge(cfg, {"model_uri": model_uri}))
        run = mlflow.get_run(evaluated.run_id)
        traces = mlflow.search_traces(locations=[experiment], run_id=evaluated.run_id, return_type="list")
        assert run.data.metrics["traces_logged"] == 4 == len(traces) and "traces_missing" not in run.data.tags
        assert {r["trace_id"] for r in evaluated.result.rows} == {t.info.trace_id for t in traces}
        for trace in traces:  # the executors' traces, with the driver's assessments on them
            assert trace.info.tags["split"] == "test" and len(trace.info.assessments) == 3
