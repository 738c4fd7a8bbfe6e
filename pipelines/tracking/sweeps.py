"""A Hydra sweep's parent run: opened (or taken over from `mlflow run`), its failed jobs recorded, its
jobs' runs read back as a comparison, and ended with it. `pipelines/sweep.py` calls these from Hydra's
hooks, outside any active run, so everything here goes through the client."""

from __future__ import annotations

import contextlib
import json
import os

import mlflow
import pandas as pd
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from pipelines.evaluation.analysis import USAGE_METRICS
from pipelines.evaluation.report import comparison_chart, comparison_row, mark_pareto, quality_cost_chart
from pipelines.evaluation.scoring import Scoring
from pipelines.evaluation.stats import Estimate

FAILED_TAG = "sweep.failed."  # + job number: a failed job, recorded by the job itself (it may have no run)


def open_parent(*, name: str, tags: dict[str, str], experiment: str) -> tuple[str, str]:
    """The sweep's parent run, (run id, experiment id). Under `mlflow run` the run it made is the parent;
    jobs nest under it rather than reuse it."""
    client = MlflowClient()
    run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    if run_id:
        client.update_run(run_id, name=name)
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        run = client.get_run(run_id)
    else:
        experiment_id = (os.environ.get("MLFLOW_EXPERIMENT_ID")
                         or mlflow.get_experiment_by_name(experiment).experiment_id)
        run = client.create_run(experiment_id, tags=tags, run_name=name)
    return run.info.run_id, run.info.experiment_id


def record_failure(run_id: str, job: int, record: dict[str, str], *, tracking_uri: str) -> None:
    """A failed job's name, overrides and error on the parent. Best effort: the job's own error is what
    Hydra reports, not a failure to record it."""
    with contextlib.suppress(Exception):
        MlflowClient(tracking_uri).set_tag(run_id, f"{FAILED_TAG}{job}", json.dumps(record))


def end_parent(run_id: str, experiment_id: str, scoring: Scoring, status: str) -> tuple[str, int, int]:
    """Log the comparison of the jobs on the parent and end it, FAILED if any job did.
    Returns (status, jobs finished, jobs in all)."""
    client = MlflowClient()
    rows = job_rows(client, run_id, experiment_id, scoring.primary)
    primary = scoring.primary
    if any(r["status"] != "FINISHED" for r in rows) or not rows:
        status = "FAILED"
    if rows:
        client.log_table(run_id, pd.DataFrame(rows), "comparison.json")
    scored = [r for r in rows if r[primary] is not None and r["status"] == "FINISHED"]
    if scored:
        client.log_figure(run_id, comparison_chart(scored, scoring), "comparison.png")
        costs = mark_pareto([r for r in scored if r.get("tokens_per_question") is not None], primary)
        if costs:
            client.log_table(run_id, pd.DataFrame(costs), "quality_cost.json")
            client.log_figure(run_id, quality_cost_chart(costs, scoring), "quality_cost.png")
        best = max(scored, key=lambda r: r[primary])
        client.log_batch(run_id, tags=[RunTag("best_variant", best["variant"]), RunTag("best_run_id", best["run_id"])])
    finished = sum(r["status"] == "FINISHED" for r in rows)
    client.log_metric(run_id, "jobs_finished", finished)
    client.log_metric(run_id, "jobs_failed", len(rows) - finished)
    client.set_terminated(run_id, status)
    return status, finished, len(rows)


def job_rows(client: MlflowClient, run_id: str, experiment_id: str, primary: str) -> list[dict]:
    """One row per job, in job order: its overrides, run, status and primary score with its interval."""
    parent = client.get_run(run_id)
    failures = {int(key[len(FAILED_TAG):]): json.loads(value) for key, value in parent.data.tags.items()
                if key.startswith(FAILED_TAG)}
    jobs = {}
    for run in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{run_id}'", max_results=10000):
        tags, metrics = run.data.tags, run.data.metrics
        if "sweep.job" not in tags:
            continue
        score = ({primary: None, "ci_low": None, "ci_high": None, "n": None} if primary not in metrics else
                 comparison_row(Estimate(value=metrics[primary], n=int(metrics.get("num_examples", 0)),
                                         low=metrics.get(f"{primary}_ci_low"),
                                         high=metrics.get(f"{primary}_ci_high")), primary))
        cost = {name: metrics.get(name) for name in USAGE_METRICS}
        jobs[int(tags["sweep.job"])] = {"variant": run.info.run_name, "overrides": tags["sweep.overrides"],
                                        "run_id": run.info.run_id, "status": run.info.status, **score,
                                        **cost, "error": tags.get("error")}
    for num, failure in failures.items():
        if num in jobs:  # its run failed too; the run says so already
            jobs[num]["status"] = "FAILED"
            jobs[num]["error"] = jobs[num]["error"] or failure["error"]
        else:  # failed before it opened a run (bad input, an LM it could not reach)
            jobs[num] = {"variant": failure["name"], "overrides": failure["overrides"], "run_id": None,
                         "status": "FAILED", primary: None, "ci_low": None, "ci_high": None, "n": None,
                         **dict.fromkeys(USAGE_METRICS), "error": failure["error"]}
    return [{"job": num, **jobs[num]} for num in sorted(jobs)]
