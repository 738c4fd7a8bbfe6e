"""Hydra sweeps (`-m`) tracked in MLflow: one parent run per sweep, a child run per job, and on the
parent, when the jobs are done, a comparison of them (`comparison.json`, `comparison.png`) and their
quality against their cost (`quality_cost.json`, `quality_cost.png`).

`MlflowSweep` is a Hydra callback (`hydra.callbacks` in conf/config.yaml). Its multirun hooks run in
the process that launches the sweep; its job hooks run wherever the launcher runs a job (in process,
a joblib worker, a submitit/SLURM job), which receives the callback pickled, parent run id included.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pipelines.cli import JobFailed
from pipelines.evaluation.scoring import Scoring
from pipelines.tracking import setup, sweeps
from pipelines.tracking.runs import SWEEP_JOB_ENV, mask_overrides

log = logging.getLogger(__name__)


class MlflowSweep(Callback):
    def __init__(self) -> None:
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.keys: list[str] = []  # the swept config keys, e.g. ["program.k"]
        self.scoring: Scoring | None = None
        self.ended = False

    def on_multirun_start(self, config: DictConfig, config_name: str | None = None, **kwargs: Any) -> None:
        # Jobs may start at the same moment: the store's schema and the experiment are made here, once.
        setup(config)
        swept = [o for o in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
                 if o.is_sweep_override()]
        self.keys = [o.key_or_group for o in swept]
        self.scoring = Scoring.from_cfg(config.scoring)
        name = f"sweep-{config_name}"
        tags = {"step": name, "sweep.params": mask_overrides(o.input_line for o in swept),
                "overrides": mask_overrides(config.hydra.overrides.task),
                "sweep.launcher": str(config.hydra.runtime.choices.get("hydra/launcher")),
                "sweep.dir": str(config.hydra.sweep.dir)}
        self.run_id, self.experiment_id = sweeps.open_parent(name=name, tags=tags,
                                                             experiment=config.tracking.experiment)
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
        sweeps.record_failure(self.run_id, config.hydra.job.num, record, tracking_uri=str(config.tracking.uri))

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
        status, finished, jobs = sweeps.end_parent(self.run_id, self.experiment_id, self.scoring, status)
        log.info("sweep run %s %s: %d of %d jobs finished", self.run_id, status, finished, jobs)
