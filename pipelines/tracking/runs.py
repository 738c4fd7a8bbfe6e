"""A step's run: where it opens (child, sweep job, `mlflow run`'s run, new), what it records first
(its name, tags, the resolved config) and how it ends (FINISHED, FAILED or KILLED, always)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import mlflow
import yaml
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from pipelines.config import flatten, is_secret, to_container
from pipelines.errors import TrackingServerError
from pipelines.tracking.store import public_uri, short_reason

if TYPE_CHECKING:
    from pipelines.schema import Config

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000
# Set in a Hydra sweep's job (pipelines/sweep.py): JSON with the sweep's run id, the job's name and tags.
SWEEP_JOB_ENV = "RAGQA_SWEEP_JOB"


@contextlib.contextmanager
def run(name: str, cfg: Config, *, tags: dict[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """Open this step's run: a child of an active run, a sweep job's child of the sweep's run (named
    after the job's swept overrides), the `mlflow run` run (renamed after the step), or a new one.

    Whatever happens inside, the run ends in a consistent state: FINISHED, FAILED (with the error
    as a tag), or KILLED on Ctrl-C.
    """
    parent = mlflow.active_run()
    sweep_job = json.loads(os.environ.get(SWEEP_JOB_ENV) or "null")
    if parent is not None:
        active = mlflow.start_run(run_name=name, nested=True)
    elif sweep_job:
        active = mlflow.start_run(run_name=f"{name} {sweep_job['name']}".strip(),
                                  parent_run_id=sweep_job["parent_run_id"], tags=sweep_job["tags"])
    elif os.environ.get("MLFLOW_RUN_ID"):
        active = mlflow.start_run()
        MlflowClient().update_run(active.info.run_id, name=name)  # not the random name `mlflow run` gave it
    else:
        active = mlflow.start_run(run_name=name)
    try:
        mlflow.set_tags({"step": name, "overrides": command_line_overrides(), **(tags or {})})
        log_config(cfg)
        yield active
    except KeyboardInterrupt:
        _fail_pending_models(active.info.run_id)
        _end_run(active, "KILLED")
        raise
    except BaseException as e:
        with contextlib.suppress(Exception):
            mlflow.set_tag("error", f"{type(e).__name__}: {e}"[:5000])
        _fail_pending_models(active.info.run_id)
        _end_run(active, "FAILED", e)
        raise
    else:
        _end_run(active, "FINISHED")


def _end_run(active: mlflow.ActiveRun, status: str, error: BaseException | None = None) -> None:
    """End the run with `status`; if the store no longer answers (a tracking server that went away
    and stayed away through MLflow's retries), say so in one line: what was logged before stays."""
    try:
        mlflow.end_run(status)
    except Exception as e:
        uri = public_uri(mlflow.get_tracking_uri())
        raise TrackingServerError(f"the tracking store {uri} stopped answering during run {active.info.run_id} "
                                  f"({short_reason(e)}); what was logged before stays there, but the run could not "
                                  f"be marked {status} and shows RUNNING until it is ended by hand") from error


def _fail_pending_models(run_id: str) -> None:
    """A model whose run failed before its program was logged ends FAILED, not PENDING forever."""
    with contextlib.suppress(Exception):
        client = MlflowClient()
        experiment_id = client.get_run(run_id).info.experiment_id
        for model in client.search_logged_models(experiment_ids=[experiment_id],
                                                 filter_string=f"source_run_id = '{run_id}'"):
            if model.status == LoggedModelStatus.PENDING:
                client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)


def command_line_overrides() -> str:
    """What the user changed on the command line (Hydra's task overrides), secrets masked, so runs
    can be filtered by it (`tags.overrides LIKE '%k=3%'`)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return ""
    return mask_overrides(HydraConfig.get().overrides.task)


def mask_overrides(overrides: Iterable[str]) -> str:
    """Hydra overrides as one string, the values of secret-looking keys masked."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return " ".join(f"{o.input_line.split('=', 1)[0]}=***" if is_secret(o.key_or_group.split(".")[-1])
                    else o.input_line for o in parsed)


def log_config(cfg: Config) -> None:
    """The resolved config as an artifact and as flattened params, with secrets removed."""
    tree = to_container(cfg)
    tree.pop("hydra", None)
    mlflow.log_text(yaml.safe_dump(tree, sort_keys=False), "config.yaml")
    existing = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    params = {}
    for key, value in flatten(tree).items():
        value = "" if value is None else str(value)[:MAX_PARAM_CHARS]
        if key in existing and existing[key] != value:
            log.warning("param %s is already logged as %r; not re-logging %r", key, existing[key], value)
        elif key not in existing:
            params[key] = value
    mlflow.log_params(params)
