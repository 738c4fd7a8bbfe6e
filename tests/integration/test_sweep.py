"""Hydra sweeps (`-m`) through each launcher against a fresh sqlite store and the fake LM: one parent
run per sweep, one child run per job, the comparison on the parent."""

import json
import sys

import mlflow

from fake_lm import FakeLM
from helpers import ROOT, fake_overrides, mlflow_run, run_cli


def sweep_overrides(store, fake: FakeLM) -> list[str]:
    """The rag smoke preset on the fake LM and embedder, outputs and artifacts inside the test's store."""
    return ["experiment=smoke", f"tracking.artifact_location={store}/artifacts", f"hydra.sweep.dir={store}/multirun",
            *fake_overrides(fake)]


def sweep(store, *overrides: str):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db", "RAGQA_CACHE_DIR": str(store / "cache")}
    return run_cli([sys.executable, "-m", "pipelines.rag", "-m", *overrides], cwd=ROOT, env=env, timeout=900)


def sweep_runs():
    """The sweep's parent run and its job runs, in job order."""
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    jobs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(jobs) == len(runs) - 1
    return parent, sorted(jobs, key=lambda r: int(r.data.tags["sweep.job"]))


def comparison(run_id, path="comparison.json"):
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{path}"))
    return [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]


def check_sweep(proc, ks: list[int]):
    assert proc.returncode == 0, proc.stderr[-3000:]
    parent, jobs = sweep_runs()
    assert parent.info.run_name == "sweep-rag" and parent.info.status == "FINISHED"
    assert parent.data.tags["sweep.params"] == f"program.k={','.join(map(str, ks))}"
    assert [j.info.run_name for j in jobs] == [f"rag k={k}" for k in ks]
    for job, k in zip(jobs, ks, strict=True):
        assert job.info.status == "FINISHED" and job.data.params["program.k"] == str(k)
        assert job.data.metrics["semantic_f1"] == 50.0 and job.data.metrics["num_examples"] == 3
    rows = comparison(parent.info.run_id)
    assert [(r["variant"], r["overrides"], r["run_id"], r["status"]) for r in rows] == [
        (j.info.run_name, f"program.k={k}", j.info.run_id, "FINISHED") for j, k in zip(jobs, ks, strict=True)]
    assert all(r["semantic_f1"] == r["ci_low"] == r["ci_high"] == 50.0 and r["n"] == 3 for r in rows)
    assert {"comparison.png", "quality_cost.png"} <= {a.path for a in mlflow.MlflowClient().list_artifacts(
        parent.info.run_id)}
    # More passages, more prompt tokens, the same fake score: only the cheapest job is on the front.
    costs = comparison(parent.info.run_id, "quality_cost.json")
    tokens = [r["tokens_per_question"] for r in costs]
    assert tokens == sorted(tokens) and [r["pareto"] for r in costs] == [True] + [False] * (len(ks) - 1)
    assert parent.data.metrics["jobs_finished"] == len(ks) and parent.data.metrics["jobs_failed"] == 0
    return parent, jobs


def test_parallel_jobs_share_a_fresh_store_under_one_sweep_run(store, fake):
    proc = sweep(store, "hydra/launcher=parallel", "hydra.launcher.n_jobs=4", *sweep_overrides(store, fake),
                 "program.k=1,2,3,4")
    parent, _ = check_sweep(proc, [1, 2, 3, 4])
    assert parent.data.tags["sweep.launcher"] == "parallel"


def test_submitit_local_jobs_nest_under_the_sweep_run(store, fake):
    proc = sweep(store, "hydra/launcher=submitit_local", *sweep_overrides(store, fake), "program.k=2,3")
    parent, _ = check_sweep(proc, [2, 3])
    assert parent.data.tags["sweep.launcher"] == "submitit_local"


def test_mlflow_run_is_the_sweep_run(store, fake):
    overrides = " ".join(["-m", *sweep_overrides(store, fake), "program.k=1,3"])
    proc = mlflow_run("rag", store, overrides=overrides)
    parent, _ = check_sweep(proc, [1, 3])
    assert parent.data.tags["mlflow.project.entryPoint"] == "rag"


def test_a_failed_job_fails_the_sweep_run_which_still_compares_the_others(store, monkeypatch, fake):
    monkeypatch.delenv("RAGQA_TEST_MISSING_KEY", raising=False)
    proc = sweep(store, *sweep_overrides(store, fake), "+judge.api_key_env=null,RAGQA_TEST_MISSING_KEY")
    assert proc.returncode == 1
    assert "error: " in proc.stderr and "needs the environment variable RAGQA_TEST_MISSING_KEY" in proc.stderr
    assert "Traceback" not in proc.stderr
    parent, (job,) = sweep_runs()  # the second job failed before it opened a run
    assert parent.info.status == "FAILED" and job.info.status == "FINISHED"
    rows = comparison(parent.info.run_id)
    assert [(r["variant"], r["status"]) for r in rows] == [("rag api_key_env=null", "FINISHED"),
                                                           ("rag api_key_env=RAGQA_TEST_MISSING_KEY", "FAILED")]
    assert rows[0]["run_id"] == job.info.run_id and rows[0]["semantic_f1"] == 50.0
    assert rows[1]["run_id"] is None and rows[1]["overrides"] == "judge.api_key_env=RAGQA_TEST_MISSING_KEY"
    assert rows[1]["error"].startswith("ConfigError: ") and "RAGQA_TEST_MISSING_KEY" in rows[1]["error"]
    assert parent.data.metrics["jobs_finished"] == 1 and parent.data.metrics["jobs_failed"] == 1
    assert "comparison.png" in {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id)}


def test_without_m_mlflow_run_is_the_steps_own_run(store, fake):
    """The sweep callback is configured for every job; a single run must not be treated as a sweep job."""
    proc = mlflow_run("rag", store, overrides=" ".join(sweep_overrides(store, fake)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MlflowSweep" not in proc.stderr  # no callback warnings
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.run_name == "rag" and run.data.tags["mlflow.project.entryPoint"] == "rag"
    assert run.info.status == "FINISHED" and "sweep.job" not in run.data.tags
