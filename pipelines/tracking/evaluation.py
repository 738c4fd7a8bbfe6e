"""What an evaluation leaves in its run: the datasets, scores with intervals (linked to the evaluated
model and dataset), paired differences, the per-example table and the traces' assessments."""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import dspy
import mlflow
import pandas as pd
from mlflow.data.dataset import Dataset
from mlflow.data.pandas_dataset import PandasDataset
from mlflow.entities import LoggedModel, LoggedModelStatus
from mlflow.exceptions import MlflowException

from pipelines.evaluation.metrics import RECALL
from pipelines.evaluation.result import EvalResult
from pipelines.evaluation.stats import Comparison, Estimate
from pipelines.tracking.traces import annotate_traces

if TYPE_CHECKING:
    from pipelines.schema import DataConfig

log = logging.getLogger(__name__)

# A broken unique key as SQL stores word it (PostgreSQL, SQLite, MySQL, SQL Server), wrapped by MLflow.
DUPLICATE_KEY = re.compile(r"UniqueViolation|duplicate key|UNIQUE constraint failed|Duplicate entry", re.IGNORECASE)


def log_datasets(splits: dict[str, list[dspy.Example]], data_cfg: DataConfig) -> dict[str, PandasDataset]:
    """Log each split as a run input; returns the datasets, to link metrics computed on them."""
    source = dataset_source(data_cfg)
    datasets = {}
    for split, examples in splits.items():
        if not examples:
            continue
        frame = pd.DataFrame([{"question": e.question, "response": e.response,
                               "gold_doc_ids": list(e.get("gold_doc_ids") or [])} for e in examples])
        dataset = mlflow.data.from_pandas(frame, source=source, name=f"{data_cfg.name}-{split}", targets="response")
        log_input(dataset, context=split)
        datasets[split] = dataset
    return datasets


def log_spark_input(frame, path: Path) -> None:
    """A Spark DataFrame read from `path` as the run's input (digest from its plan: no pass over the data)."""
    with warnings.catch_warnings():  # MLflow's advice on integer columns (an id) is for model signatures
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
        dataset = mlflow.data.from_spark(frame, path=str(path), name=path.name)
    log_input(dataset, context="predict")


def log_input(dataset: Dataset, *, context: str) -> None:
    """`mlflow.log_input`, safe when other runs log the same dataset at the same moment (a sweep's jobs).

    A SQL store looks for the dataset's row (experiment, name, digest), then inserts it; runs that looked
    at once all insert, and all but the first to commit break the row's key and get BAD_REQUEST. The row
    exists by then, so one more try links to it. Any other error, or the same one twice, is raised.
    """
    try:
        mlflow.log_input(dataset, context=context)
    except MlflowException as error:
        if not (error.error_code == "BAD_REQUEST" and "dataset" in error.message
                and DUPLICATE_KEY.search(error.message)):
            raise
        log.info("dataset %s was logged by another run at the same moment; linking this run to it", dataset.name)
        mlflow.log_input(dataset, context=context)


def dataset_source(data_cfg: DataConfig):
    """Where the examples came from: their download URL, else the local file as a `file://` URI.

    Given a bare path, MLflow finds two identical local-file source types registered (one per URI
    scheme, both of type "local") and warns on every split; offering it only the first leaves
    nothing to guess.
    """
    from mlflow.data.dataset_source_registry import get_registered_sources, resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    if data_cfg.examples_url:
        return HTTPDatasetSource(data_cfg.examples_url)
    uri = Path(data_cfg.examples).resolve().as_uri()
    local = [s for s in get_registered_sources() if s._get_source_type() == "local" and s._can_resolve(uri)]
    return resolve_dataset_source(uri, candidate_sources=local[:1])


def log_metrics(metrics: dict[str, float], *, model: LoggedModel | None = None,
                dataset: PandasDataset | None = None) -> None:
    """Metrics of the active run, linked to the model they measure and the dataset they were computed on.

    A model still PENDING is logged by this run: `log_model` then links the run's metrics to it itself
    (and fails on metrics already linked). Others (external, or logged earlier) are linked here.
    """
    linked = model if model is not None and model.status != LoggedModelStatus.PENDING else None
    mlflow.log_metrics(metrics, model_id=linked.model_id if linked else None, dataset=dataset)


def estimate_metrics(estimates: dict[str, Estimate], prefix: str = "", *, examples: int | None = None
                     ) -> dict[str, float]:
    """`{prefix}{metric}` with `_ci_low` and `_ci_high` beside it when there is an interval, and `_n` (how
    many examples the mean is over) when that is not all `examples` (the judge left some unscored)."""
    metrics = {}
    for name, estimate in estimates.items():
        metrics[f"{prefix}{name}"] = estimate.value
        if examples is not None and estimate.n != examples:
            metrics[f"{prefix}{name}_n"] = estimate.n
        if estimate.half_width is not None:
            metrics[f"{prefix}{name}_ci_low"] = estimate.low
            metrics[f"{prefix}{name}_ci_high"] = estimate.high
    return metrics


def comparison_metrics(comparisons: dict[str, Comparison], prefix: str = "") -> dict[str, float]:
    """`{prefix}{metric}_delta` with its `_ci_low`, `_ci_high` and `_p_value`."""
    metrics = {}
    for name, comparison in comparisons.items():
        metrics.update(estimate_metrics({f"{name}_delta": comparison.delta}, prefix))
        if comparison.p_value is not None:
            metrics[f"{prefix}{name}_delta_p_value"] = comparison.p_value
    return metrics


def log_evaluation(result: EvalResult, *, split: str, prefix: str = "", model: LoggedModel | None = None,
                   dataset: PandasDataset | None = None) -> None:
    """Metrics with intervals (linked to the evaluated model and dataset), the per-example table and
    trace assessments, named alike for every entry point."""
    metrics = {
        **estimate_metrics(result.estimates, prefix, examples=result.num_examples),
        f"{prefix}failed_examples": result.failed,
        f"{prefix}judge_failures": result.judge_failures,
        f"{prefix}num_examples": result.num_examples,
        **failure_metrics(result, prefix),
        **{f"{prefix}{name}": round(value, 4) for name, value in result.usage.items() if value is not None},
    }
    if any("member_errors" in r for r in result.rows):
        metrics[f"{prefix}member_errors"] = sum(r.get("member_errors") or 0 for r in result.rows)
    missing = [e.no_interval_reason for e in result.estimates.values() if e.no_interval_reason]
    if missing:
        log.warning("%s%s scores have %s", prefix, split, missing[0])
        mlflow.set_tag(f"{prefix}confidence_intervals", f"not computed: {missing[0]}")
    for name in result.unscored:  # no metric at all, never a 0: the judge gave no verdict on any example
        log.warning("%s%s: %s %s", prefix, split, name, result.no_example_scored())
        mlflow.set_tag(f"{prefix}{name}", f"not computed: {result.no_example_scored()}")
    if RECALL not in result.estimates and any("retrieved_doc_ids" in r for r in result.rows):
        mlflow.set_tag(f"{prefix}recall_at_k", "not computed: the data has no gold_doc_ids / corpus doc_ids")
    if result.judge:  # which judge (LM, and aligned version) scored the judged metrics of this run
        mlflow.set_tag(f"{prefix}judge", result.judge)
    log_metrics(metrics, model=model, dataset=dataset)
    log_table(result.rows, f"eval/{prefix}{split}_results.json")
    annotate_traces(result)


def failure_metrics(result: EvalResult, prefix: str = "") -> dict[str, float]:
    """`failure_<mode>` (examples) and `failure_<mode>_share` (0-1) for every failure mode
    (`pipelines.evaluation.analysis`), `failure_judge_failed` included."""
    metrics = {}
    for mode, count in result.failure_counts.items():
        metrics[f"{prefix}failure_{mode}"] = count
        metrics[f"{prefix}failure_{mode}_share"] = round(count / max(result.num_examples, 1), 4)
    return metrics


def log_table(rows: list[dict], artifact_file: str) -> None:
    if rows:
        mlflow.log_table(pd.DataFrame(rows), artifact_file=artifact_file)


def load_table(run_id: str, artifact_file: str) -> list[dict] | None:
    """Rows of a table a run logged with `log_table`, or None if it has no such artifact. Read from the run
    itself: `mlflow.load_table` looks only in the active experiment, and a champion or an optimize run may
    live in another."""
    try:
        with open(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_file)) as f:
            table = json.load(f)  # log_table's layout: {"columns": [...], "data": [[...], ...]}
    except (mlflow.exceptions.MlflowException, OSError, ValueError):
        return None
    return [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
