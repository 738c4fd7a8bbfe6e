"""Hydra sweeps (`-m`) tracked in MLflow: one parent run per sweep, a child run per job, and on the
parent, when the jobs are done, a comparison of them (`comparison.json`, `comparison.png`) and their
quality against their cost (`quality_cost.json`, `quality_cost.png`).

`MlflowSweep` is a Hydra callback (`hydra.callbacks` in conf/config.yaml). Its multirun hooks run in
the process that launches the sweep; its job hooks run wherever the launcher runs a job (in process,
a joblib worker, a submitit/SLURM job), which receives the callback pickled, parent run id included.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
from typing import Any

import mlflow
import pandas as pd
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from pipelines import tracking
from pipelines.cli import JobFailed
from pipelines.evaluation.analysis import USAGE_METRICS
from pipelines.evaluation.report import comparison_chart, comparison_row, mark_pareto, quality_cost_chart
from pipelines.evaluation.scoring import Scoring
from pipelines.evaluation.stats import Estimate
from pipelines.tracking.runs import SWEEP_JOB_ENV, mask_overrides

log = logging.getLogger(__name__)

FAILED_TAG = "sweep.failed."  # + job number: a failed job, recorded by the job itself (it may have no run)


class MlflowSweep(Callback):
    def __init__(self) -> None:
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.keys: list[str] = []  # the swept config keys, e.g. ["program.k"]
        self.scoring: Scoring | None = None
        self.ended = False

    def on_multirun_start(self, config: DictConfig, config_name: str | None = None, **kwargs: Any) -> None:
        # Jobs may start at the same moment: the store's schema and the experiment are made here, once.
        tracking.setup(config)
        swept = [o for o in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
                 if o.is_sweep_override()]
        self.keys = [o.key_or_group for o in swept]
        self.scoring = Scoring.from_cfg(config.scoring)
        name = f"sweep-{config_name}"
        tags = {"step": name, "sweep.params": mask_overrides(o.input_line for o in swept),
                "overrides": mask_overrides(config.hydra.overrides.task),
                "sweep.launcher": str(config.hydra.runtime.choices.get("hydra/launcher")),
                "sweep.dir": str(config.hydra.sweep.dir)}
        client = MlflowClient()
        # Under `mlflow run` the run it made is the sweep's parent; jobs nest under it rather than reuse it.
        run_id = os.environ.pop("MLFLOW_RUN_ID", None)
        if run_id:
            client.update_run(run_id, name=name)
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            run = client.get_run(run_id)
        else:
            experiment_id = (os.environ.get("MLFLOW_EXPERIMENT_ID")
                             or mlflow.get_experiment_by_name(config.tracking.experiment).experiment_id)
            run = client.create_run(experiment_id, tags=tags, run_name=name)
        self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        # A failed job makes Hydra exit before on_multirun_end: the parent still ends, FAILED.
        atexit.register(self._end, "FAILED")
        log.info("%s: sweep run %s over %s", name, self.run_id, tags["sweep.params"])

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.run_id is None:  # a single run (no -m): Hydra calls job hooks there too
            return
        os.environ.pop("MLFLOW_RUN_ID", None)  # the sweep's run, not this job's
        os.environ["MLFLOW_EXPERIMENT_ID"] = self.experiment_id
        os.environ[SWEEP_JOB_ENV] = json.dumps({
            "parent_run_id": self.run_id, "name": self._job_name(config),
            "tags": {"sweep.job": str(config.hydra.job.num), "sweep.overrides": self._job_overrides(config)}})

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        os.environ.pop(SWEEP_JOB_ENV, None)
        if self.run_id is None or job_return.status != JobStatus.FAILED:
            return
        error = job_return._return_value  # `return_value` re-raises it
        if isinstance(error, JobFailed):
            error = error.__cause__
        record = {"name": f"{config.hydra.job.config_name} {self._job_name(config)}".strip(),
                  "overrides": self._job_overrides(config), "error": f"{type(error).__name__}: {error}"[:4000]}
        # Best effort: the job's own error is what Hydra reports, not a failure to record it.
        with contextlib.suppress(Exception):
            MlflowClient(str(config.tracking.uri)).set_tag(self.run_id, f"{FAILED_TAG}{config.hydra.job.num}",
                                                           json.dumps(record))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._end("FINISHED")

    def _swept(self, config: DictConfig) -> list[tuple[str, str]]:
        """This job's values of the swept keys, as (key, value)."""
        overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        return [(o.key_or_group, o.get_value_element_as_str()) for o in overrides if o.key_or_group in self.keys]

    def _job_name(self, config: DictConfig) -> str:
        """`k=3` for `program.k=3`: the last part of each swept key is enough to tell the jobs apart."""
        return " ".join(f"{key.split('.')[-1]}={value}" for key, value in self._swept(config))

    def _job_overrides(self, config: DictConfig) -> str:
        return mask_overrides(f"{key}={value}" for key, value in self._swept(config))

    def _end(self, status: str) -> None:
        """Log the comparison of the jobs on the sweep's run and end it; FAILED if any job did."""
        if self.ended or self.run_id is None:
            return
        self.ended = True
        client = MlflowClient()
        rows = self._rows(client)
        primary = self.scoring.primary
        if any(r["status"] != "FINISHED" for r in rows) or not rows:
            status = "FAILED"
        if rows:
            client.log_table(self.run_id, pd.DataFrame(rows), "comparison.json")
        scored = [r for r in rows if r[primary] is not None and r["status"] == "FINISHED"]
        if scored:
            client.log_figure(self.run_id, comparison_chart(scored, self.scoring), "comparison.png")
            costs = mark_pareto([r for r in scored if r.get("tokens_per_question") is not None], primary)
            if costs:
                client.log_table(self.run_id, pd.DataFrame(costs), "quality_cost.json")
                client.log_figure(self.run_id, quality_cost_chart(costs, self.scoring), "quality_cost.png")
            best = max(scored, key=lambda r: r[primary])
            client.log_batch(self.run_id, tags=[RunTag("best_variant", best["variant"]),
                                                RunTag("best_run_id", best["run_id"])])
        finished = sum(r["status"] == "FINISHED" for r in rows)
        client.log_metric(self.run_id, "jobs_finished", finished)
        client.log_metric(self.run_id, "jobs_failed", len(rows) - finished)
        client.set_terminated(self.run_id, status)
        log.info("sweep run %s %s: %d of %d jobs finished", self.run_id, status, finished, len(rows))

    def _rows(self, client: MlflowClient) -> list[dict]:
        """One row per job, in job order: its overrides, run, status and primary score with its interval."""
        primary = self.scoring.primary
        parent = client.get_run(self.run_id)
        failures = {int(key[len(FAILED_TAG):]): json.loads(value) for key, value in parent.data.tags.items()
                    if key.startswith(FAILED_TAG)}
        jobs = {}
        for run in client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{self.run_id}'",
                                      max_results=10000):
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
