"""The main job as the README runs it (smoke-sized), through `mlflow run`, on the real embedded LM: the
story the MLflow UI tells afterwards, checked through MLflow's API."""

import sys

from mlflow.entities import LoggedModelStatus, SpanType
from mlflow.tracking import MlflowClient

from helpers import mlflow_run, run_cli

MODEL = "ragqa-tech-smoke"


def test_main_runs_three_children_and_the_ui_tells_the_story(store, local_server):
    # 3 train examples: MIPROv2 validates its trials on 2 of them (smoke's 5 give 4, ~50 s more here)
    proc = mlflow_run("main", store, overrides="experiment=smoke data.train_size=3")
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    (parent,) = [r for r in runs if r.data.tags.get("step") == "main"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["step"] for r in children) == ["cot", "optimize", "rag"]
    assert all(r.info.status == "FINISHED" for r in children + [parent])
    assert {"comparison.png", "comparison.json", "failure_modes.png", "quality_cost.png", "quality_cost.json"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    for step in ("cot", "rag", "optimize"):  # judge-free on the embedded stack: no SemanticF1 call paid for
        assert f"{step}_token_f1_ci_high" in parent.data.metrics and f"{step}_semantic_f1" not in parent.data.metrics
        assert sum(parent.data.metrics[f"{step}_failure_{mode}"] for mode in
                   ("ok", "ok_without_gold", "answer_miss", "retrieval_miss", "judge_failed", "failed")) == 3
    for pair in ("rag_vs_cot", "optimize_vs_cot", "optimize_vs_rag"):
        for metric in ("token_f1", "rouge_l"):
            assert f"{pair}_{metric}_delta_p_value" in parent.data.metrics
    check_what_the_ui_shows(client, parent, children)
    check_the_champion_answers(store)


def check_what_the_ui_shows(client, parent, children):
    """What a user sees in the MLflow UI after the main job: runs named after their step (the `mlflow
    run` parent too), one READY model per program and none PENDING, every evaluation's traces linked to
    a model and tagged with its variant, retrieval as a RETRIEVER span, evaluations marked as such, and
    the champion found through the registry's alias."""
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
            assert len(trace.info.assessments) >= 2 and trace.info.tags["failure_mode"]  # one per metric
            retrievals = [s for s in trace.data.spans if s.span_type == SpanType.RETRIEVER]
            if trace.info.tags["variant"] != "cot":
                assert retrievals and len(retrievals[0].outputs) == 5
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.run_id in {r.info.run_id for r in children}
    assert all("champion" not in r.data.tags for r in children)  # the alias, not a stale run tag


def check_the_champion_answers(store):
    """The champion in a fresh process, as the README shows: pyfunc with pickles refused."""
    code = ("import mlflow\n"
            f"model = mlflow.pyfunc.load_model('models:/{MODEL}@champion')\n"
            "print('ANSWER=' + model.predict({'question': 'how do I undo my last git commit?'})['response'][0])\n")
    proc = run_cli([sys.executable, "-c", code], cwd=store,
                   env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db",
                        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"})
    assert proc.returncode == 0 and proc.stdout.split("ANSWER=", 1)[1].strip(), proc.stderr[-3000:]
