"""Entry points through `mlflow run`, as a user runs them, against the fake LM and embedding server:
what each run logs, registers and serves."""

import json
import sys

import pytest
from mlflow.tracking import MlflowClient

from helpers import FAKE_KEY, fake_overrides, mlflow_run, run_cli

MODEL = "ragqa-tech-smoke"


def fake_stack(fake) -> str:
    """The smoke preset with LM, judge and embedder at the fake server."""
    return " ".join(["experiment=smoke", *fake_overrides(fake)])


def client_for(store):
    return MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")


def all_runs(store):
    client = client_for(store)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, max_results=1000)


def top_level(store, step):
    return [r for r in all_runs(store) if r.data.tags.get("step") == step]


def check(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def ask(store, model_uri, question):
    """Load a model in a fresh Python process and answer one question through pyfunc (no pickle to allow)."""
    code = ("import json, sys, mlflow\n"
            f"model = mlflow.pyfunc.load_model({model_uri!r})\n"
            f"answer = model.predict({{'question': {question!r}}}).iloc[0].to_dict()\n"
            "print('ANSWER=' + json.dumps(answer, default=list))\n")
    proc = run_cli([sys.executable, "-c", code], cwd=store,
                   env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db"})
    check(proc)
    return json.loads(proc.stdout.split("ANSWER=", 1)[1])


def test_cot_logs_everything_and_loads_back_without_leaking_a_key(store, fake):
    proc = mlflow_run("cot", store, fake_stack(fake), env={"OPENAI_API_KEY": FAKE_KEY})
    check(proc)
    (run,) = top_level(store, "cot")
    assert run.info.status == "FINISHED" and run.info.run_name == "cot"
    assert "cot dev: SemanticF1 = 50.0 ± 0.0" in proc.stdout  # the step's name, not MLflow's random one
    metrics = run.data.metrics
    assert metrics["semantic_f1_ci_low"] <= metrics["semantic_f1"] <= metrics["semantic_f1_ci_high"] <= 100
    assert metrics["num_examples"] == 3 and 0 <= metrics["token_f1"] <= 100 and 0 <= metrics["rouge_l"] <= 100
    for key in ("failed_examples", "prompt_tokens", "completion_tokens", "cost_usd"):
        assert key in run.data.metrics
    client = client_for(store)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "eval"} <= artifacts
    table = json.loads(open(client.download_artifacts(run.info.run_id, "eval/dev_results.json")).read())
    assert {"question", "gold", "reasoning", "prediction", "semantic_f1", "token_f1", "rouge_l",
            "semantic_f1_rationale", "trace_id"} <= set(table["columns"])
    assert len(table["data"]) == 3
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"sample-train", "sample-dev"}
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    answer = ask(store, f"models:/{MODEL}/{versions[0].version}", "how do I undo my last git commit?")
    assert answer["response"] == "fake response"
    leaks = [p for p in store.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert leaks == [] and FAKE_KEY not in proc.stdout + proc.stderr


def test_rag_caches_its_index_logs_recall_and_answers_with_retrieval(store, fake):
    check(mlflow_run("rag", store, fake_stack(fake)))
    check(mlflow_run("rag", store, fake_stack(fake)))
    first, second = sorted(top_level(store, "rag"), key=lambda r: r.info.start_time)
    assert first.data.tags["index.cache"] == "built" and first.data.metrics["index_embedded_texts"] > 0
    assert second.data.tags["index.cache"] == "hit" and second.data.metrics["index_embedded_texts"] == 0
    for run in (first, second):
        assert run.info.status == "FINISHED" and 0 <= run.data.metrics["recall_at_k"] <= 100
    client = client_for(store)
    assert "index" not in {a.path for a in client.list_artifacts(second.info.run_id)}  # one copy: the model's
    (model,) = client.search_logged_models([second.info.experiment_id],
                                           filter_string=f"source_run_id = '{second.info.run_id}'")
    files = {a.path for a in client.list_logged_model_artifacts(model.model_id, "artifacts/program/index")}
    assert "artifacts/program/index/embeddings.npy" in files
    table = json.loads(open(client.download_artifacts(second.info.run_id, "eval/dev_results.json")).read())
    assert {"passages", "retrieved_doc_ids", "recall_at_k"} <= set(table["columns"])
    version = client.search_model_versions(f"run_id='{second.info.run_id}'")[0].version
    answer = ask(store, f"models:/{MODEL}/{version}", "how do I undo my last git commit?")
    assert len(answer["doc_ids"]) == 5 and len(answer["context"]) == 5 and answer["response"]


def test_optimize_then_evaluate_the_champion(store, fake):
    check(mlflow_run("optimize", store, fake_stack(fake)))
    (run,) = top_level(store, "optimize")
    metrics = run.data.metrics
    assert run.info.status == "FINISHED"
    assert metrics["semantic_f1_delta"] == pytest.approx(metrics["semantic_f1"] - metrics["baseline_semantic_f1"],
                                                         abs=1e-3)  # each rounded to 4 decimals
    assert metrics["semantic_f1_delta_ci_low"] <= metrics["semantic_f1_delta"] <= metrics["semantic_f1_delta_ci_high"]
    client = client_for(store)
    paths = {a.path for a in client.list_artifacts(run.info.run_id, "program")}
    assert {"program/program.json", "program/learned_prompt.md"} <= paths
    side = json.loads(open(client.download_artifacts(run.info.run_id, "eval/dev_side_by_side.json")).read())
    assert {"baseline_answer", "baseline_semantic_f1", "optimized_answer", "optimized_semantic_f1"} <= set(
        side["columns"])
    trials = client.get_metric_history(run.info.run_id, "mipro_trial_score")
    assert trials and "mipro_best_score" in metrics, "MIPROv2's trial scores should be step metrics"
    assert [m.step for m in trials] == sorted(m.step for m in trials)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.run_id == run.info.run_id and champion.tags["dev_semantic_f1"].startswith(
        f"{metrics['semantic_f1']:.1f}")

    proc = mlflow_run("evaluate", store, fake_stack(fake),
                      extra=["-P", f"model_uri=models:/{MODEL}@champion", "-P", "split=test"])
    check(proc)
    (evaluation,) = [r for r in all_runs(store) if r.data.tags.get("step") == "evaluate-test"]
    assert evaluation.data.params["model_uri"] == f"models:/{MODEL}@champion"
    assert "evaluate-test test: SemanticF1 = " in proc.stdout
    assert 0 <= evaluation.data.metrics["test_semantic_f1"] <= 100
    assert "test_semantic_f1" in client.get_model_version(MODEL, champion.version).tags


def test_openai_without_a_key_fails_fast_and_leaves_no_running_run(store, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    proc = mlflow_run("cot", store, overrides="experiment=smoke lm=openai")
    assert proc.returncode != 0
    assert "error: lm.model=openai/gpt-4o-mini needs the environment variable OPENAI_API_KEY" in proc.stderr
    assert all(r.info.status != "RUNNING" for r in all_runs(store))
