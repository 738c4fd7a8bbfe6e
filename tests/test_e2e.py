"""Entry points end to end through `mlflow run`, as a user runs them, on the embedded offline stack."""

import json
import sys

import pytest
from mlflow.entities import LoggedModelStatus, SpanType
from mlflow.tracking import MlflowClient

from helpers import FAKE_KEY, MLFLOW, ROOT, mlflow_run, run_cli, served

pytestmark = [pytest.mark.lm, pytest.mark.e2e]
MODEL = "ragqa-tech-smoke"


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
            f"print('ANSWER=' + json.dumps(model.predict({{'question': {question!r}}}), default=str))\n")
    proc = run_cli([sys.executable, "-c", code], cwd=store,
                   env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db"})
    check(proc)
    return json.loads(proc.stdout.split("ANSWER=", 1)[1])


def test_cot_logs_everything_and_loads_back_without_leaking_a_key(store, local_server):
    proc = mlflow_run("cot", store, env={"OPENAI_API_KEY": FAKE_KEY})
    check(proc)
    (run,) = top_level(store, "cot")
    assert run.info.status == "FINISHED"
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
    assert isinstance(answer["response"], str) and answer["response"]
    leaks = [p for p in store.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert leaks == [] and FAKE_KEY not in proc.stdout + proc.stderr


def test_rag_caches_its_index_logs_recall_and_answers_with_retrieval(store, local_server):
    check(mlflow_run("rag", store))
    check(mlflow_run("rag", store))
    first, second = sorted(top_level(store, "rag"), key=lambda r: r.info.start_time)
    assert first.data.tags["index.cache"] == "built" and first.data.metrics["index_embedded_texts"] > 0
    assert second.data.tags["index.cache"] == "hit" and second.data.metrics["index_embedded_texts"] == 0
    for run in (first, second):
        assert run.info.status == "FINISHED" and 0 <= run.data.metrics["recall_at_k"] <= 100
    client = client_for(store)
    assert {a.path for a in client.list_artifacts(second.info.run_id, "index")} >= {"index/meta.json",
                                                                                  "index/embeddings.npy"}
    table = json.loads(open(client.download_artifacts(second.info.run_id, "eval/dev_results.json")).read())
    assert {"passages", "retrieved_doc_ids", "recall_at_k"} <= set(table["columns"])
    version = client.search_model_versions(f"run_id='{second.info.run_id}'")[0].version
    answer = ask(store, f"models:/{MODEL}/{version}", "how do I undo my last git commit?")
    assert len(answer["doc_ids"]) == 5 and len(answer["context"]) == 5 and answer["response"]


def test_optimize_then_evaluate_the_champion_then_serve_it(store, local_server):
    check(mlflow_run("optimize", store))
    (run,) = top_level(store, "optimize")
    metrics = run.data.metrics
    assert run.info.status == "FINISHED"
    assert metrics["semantic_f1_delta"] == pytest.approx(metrics["semantic_f1"] - metrics["baseline_semantic_f1"],
                                                         abs=1e-3)  # each rounded to 4 decimals
    assert metrics["semantic_f1_delta_ci_low"] <= metrics["semantic_f1_delta"] <= metrics["semantic_f1_delta_ci_high"]
    assert 0 < metrics["semantic_f1_delta_p_value"] <= 1
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
    assert champion.run_id == run.info.run_id and float(champion.tags["dev_semantic_f1"]) == pytest.approx(
        metrics["semantic_f1"], abs=1e-3)

    proc = run_cli([MLFLOW,
                    "run", str(ROOT), "-e", "evaluate", "--env-manager", "local",
                    "-P", f"model_uri=models:/{MODEL}@champion", "-P", "split=test",
                    "-P", "overrides=experiment=smoke"], cwd=store,
                   env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db", "RAGQA_CACHE_DIR": str(store / "cache")})
    check(proc)
    (evaluation,) = [r for r in all_runs(store) if r.data.tags.get("step") == "evaluate-test"]
    assert evaluation.data.params["model_uri"] == f"models:/{MODEL}@champion"
    assert 0 <= evaluation.data.metrics["test_semantic_f1"] <= 100
    assert "test_semantic_f1" in client.get_model_version(MODEL, champion.version).tags

    with served(f"models:/{MODEL}@champion", store, {"MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db"}) as serve:
        answer = serve("how do I undo my last git commit?")
    assert answer["predictions"]["response"]


def test_main_runs_three_children_and_draws_the_comparison(store, local_server):
    check(mlflow_run("main", store))
    (parent,) = top_level(store, "main")
    children = [r for r in all_runs(store) if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["step"] for r in children) == ["cot", "optimize", "rag"]
    assert all(r.info.status == "FINISHED" for r in children + [parent])
    paths = {a.path for a in client_for(store).list_artifacts(parent.info.run_id)}
    assert {"comparison.png", "comparison.json"} <= paths
    for step in ("cot", "rag", "optimize"):
        assert f"{step}_semantic_f1" in parent.data.metrics and f"{step}_semantic_f1_ci_high" in parent.data.metrics
    for pair in ("rag_vs_cot", "optimize_vs_cot", "optimize_vs_rag"):
        assert f"{pair}_semantic_f1_delta_p_value" in parent.data.metrics
    check_what_the_ui_shows(store, parent, children)


def check_what_the_ui_shows(store, parent, children):
    """Through the API, what a user sees in the MLflow UI after the main job: runs named after their
    step (the `mlflow run` parent too), one READY model per program and none PENDING, every
    evaluation's traces linked to a model and tagged with its variant, retrieval as a RETRIEVER span,
    evaluations marked as such, and the champion found through the registry's alias."""
    client = client_for(store)
    assert all(r.info.run_name == r.data.tags["step"] for r in children + [parent])
    experiment_id = parent.info.experiment_id
    models = client.search_logged_models(experiment_ids=[experiment_id])
    assert sorted(m.name for m in models) == ["cot", "rag", "rag", "rag-mipro"]  # + the baseline inside optimize
    assert all(m.status.to_int() == LoggedModelStatus.READY.to_int() for m in models)
    model_names = {m.model_id: m.name for m in models}
    for run in children:
        assert run.data.tags["mlflow.runType"] == "genai_evaluate"
        traces = client.search_traces(locations=[experiment_id], run_id=run.info.run_id, max_results=100)
        assert len(traces) == run.data.metrics["traces_logged"] + run.data.metrics.get("baseline_traces_logged", 0)
        for trace in traces:
            assert model_names[trace.info.trace_metadata["mlflow.modelId"]] == trace.info.tags["variant"]
            retrievals = [s for s in trace.data.spans if s.span_type == SpanType.RETRIEVER]
            if trace.info.tags["variant"] != "cot":
                assert retrievals and len(retrievals[0].outputs) == 5
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.run_id in {r.info.run_id for r in children}
    assert all("champion" not in r.data.tags for r in children)  # the alias, not a stale run tag


def test_openai_without_a_key_fails_fast_and_leaves_no_running_run(store, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    proc = mlflow_run("cot", store, overrides="experiment=smoke lm=openai")
    assert proc.returncode != 0
    assert "error: lm.model=openai/gpt-4o-mini needs the environment variable OPENAI_API_KEY" in proc.stderr
    assert all(r.info.status != "RUNNING" for r in all_runs(store))
