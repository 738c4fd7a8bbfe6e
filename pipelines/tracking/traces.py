"""Traces of evaluations: tagged and linked to the evaluated model, counted once stored, and each
example's metrics attached to its trace as assessments."""

from __future__ import annotations

import contextlib
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import mlflow
from mlflow.entities import AssessmentError, AssessmentSource, AssessmentSourceType, Feedback, LoggedModel
from mlflow.tracing.constant import TraceMetadataKey
from mlflow.tracing.trace_manager import InMemoryTraceManager
from mlflow.utils.mlflow_tags import MLFLOW_RUN_TYPE, MLFLOW_RUN_TYPE_GENAI_EVALUATE

from pipelines.evaluation.metrics import JUDGED_METRICS
from pipelines.evaluation.result import EvalResult
from pipelines.tracking import trace_export
from pipelines.tracking.serving import TRACE_EXECUTORS, TRACING

log = logging.getLogger(__name__)

FAILURE_MODE = "failure_mode"  # trace tag: the example's failure mode (pipelines/evaluation/analysis.py)

# Tags for every trace of the evaluation in progress (one at a time per process), and metadata: on a
# Spark executor, the driver's run, which MLflow links traces to only in the process that opened it.
_trace_tags: dict[str, str] = {}
_trace_metadata: dict[str, str] = {}


def tag_traces(span) -> None:
    """Span processor: a root span carries the evaluation's tags (and metadata) into its trace before export."""
    if span.parent_id is None and (_trace_tags or _trace_metadata):
        with InMemoryTraceManager.get_instance().get_trace(span.trace_id) as trace:
            if trace is not None:
                trace.info.tags.update(_trace_tags)
                trace.info.trace_metadata.update(_trace_metadata)


@contextlib.contextmanager
def evaluating(model: LoggedModel | None, **tags: str) -> Iterator[None]:
    """Traces made inside link to `model` (its Traces tab) and carry `tags` (variant, phase, split).

    The run is marked as an evaluation run, as `mlflow.genai.evaluate` marks its own, so the UI lists
    it with its traces and assessments."""
    mlflow.set_tag(MLFLOW_RUN_TYPE, MLFLOW_RUN_TYPE_GENAI_EVALUATE)
    _trace_tags.update(tags)
    try:
        with mlflow.set_active_model(model_id=model.model_id) if model else contextlib.nullcontext():
            yield
    finally:
        _trace_tags.clear()


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Traces finished inside wait in memory until `annotate_traces` writes each with its assessments,
    in bulk; what no assessment claimed is written when the block ends."""
    trace_export.hold()
    try:
        yield
    finally:
        trace_export.release({})


def count_traces(run_id: str) -> int:
    """Traces logged in a run."""
    experiment_id = mlflow.get_run(run_id).info.experiment_id
    return len(mlflow.search_traces(locations=[experiment_id], run_id=run_id, include_spans=False,
                                    return_type="list"))


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def watch_traces(expected: int, prefix: str = "") -> Iterator[None]:
    """Check that the traces of the evaluation inside made it to the store, and say why not.

    MLflow drops a trace it cannot write with a log line only; here the count is a metric
    (`traces_logged`) and a shortfall is a warning and a tag naming the export errors.
    `expected` 0 means tracing is off: nothing to check.
    """
    if not expected:
        yield
        return
    failures = _Warnings()
    exporter_log = logging.getLogger("mlflow.tracing.export")
    exporter_log.addHandler(failures)
    run_id = mlflow.active_run().info.run_id
    before = count_traces(run_id)
    try:
        yield
        mlflow.flush_trace_async_logging()
    finally:
        exporter_log.removeHandler(failures)
    logged = count_traces(run_id) - before
    mlflow.log_metric(f"{prefix}traces_logged", logged)
    if logged < expected:
        reasons = "; ".join(dict.fromkeys(m[:300] for m in failures.messages)) or "no export error was reported"
        message = f"{expected - logged} of {expected} traces were not written to the store ({reasons})"
        log.warning(message)
        mlflow.set_tag(f"{prefix}traces_missing", message[:5000])


def executors_trace() -> bool:
    """Whether Spark executors trace: only to a tracking server; a local store is a file that executors
    on other machines cannot reach and that concurrent writers lock (one line says so)."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        return True
    log.info("Spark executors do not trace: the tracking store %s is a local file, which executors on other "
             "machines cannot reach and concurrent writers lock; point MLFLOW_TRACKING_URI at an mlflow server "
             "to trace them", uri)
    return False


def executor_tracing() -> dict[str, str]:
    """The environment a `spark_udf` needs to trace this run's predictions (credentials travel as the
    job's other secrets do, pipelines/scale/spark.py); tracing off when executors do not trace (a local
    master's executors would otherwise trace to the driver's store file: `spark_udf` points them at it)."""
    if not executors_trace():
        return {TRACING: "false"}
    return {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), TRACE_EXECUTORS: "true", TRACING: "true",
            "MLFLOW_EXPERIMENT_ID": mlflow.active_run().info.experiment_id}


@dataclass(frozen=True)
class ExecutorTracing:
    """Where the executors of a Spark evaluation trace: this run, linked to the evaluated model, with the
    evaluation's tags. It travels to the executors with the job (so it stays picklable), where
    `on_executor` traces their calls."""

    uri: str
    experiment_id: str
    run_id: str
    model_id: str | None
    tags: dict[str, str]

    @contextlib.contextmanager
    def on_executor(self) -> Iterator[Callable[[], str | None]]:
        """On a Spark executor: trace the calls inside as this says, and yield the function that tells a
        row's trace id."""
        mlflow.set_tracking_uri(self.uri)
        os.environ["MLFLOW_EXPERIMENT_ID"] = self.experiment_id
        trace_export.install()
        mlflow.tracing.configure(span_processors=[tag_traces])
        mlflow.dspy.autolog(log_traces=True, log_traces_from_eval=True, silent=True)
        _trace_tags.clear()
        _trace_tags.update(self.tags)
        _trace_metadata.update({TraceMetadataKey.SOURCE_RUN: self.run_id})
        try:
            with mlflow.set_active_model(model_id=self.model_id) if self.model_id else contextlib.nullcontext():
                yield last_trace_id
            mlflow.flush_trace_async_logging()  # the worker may be stopped before the queue drains
        finally:
            _trace_tags.clear()
            _trace_metadata.clear()


def evaluation_tracing(model: LoggedModel | None, **tags: str) -> ExecutorTracing | None:
    """Where executors of a Spark evaluation trace: this run, linked to `model`, with `tags`; None when
    executors do not trace."""
    if not executors_trace():
        return None
    run = mlflow.active_run()
    return ExecutorTracing(uri=mlflow.get_tracking_uri(), experiment_id=run.info.experiment_id,
                           run_id=run.info.run_id, model_id=model.model_id if model else None, tags=tags)


def last_trace_id() -> str | None:
    """The trace this thread finished last: inside a `dspy.Evaluate` metric, the example's program call."""
    return mlflow.get_last_active_trace_id(thread_local=True)


def annotate_traces(result: EvalResult) -> None:
    """Every metric of every traced example as one feedback on its trace (0-100), to sort and filter by,
    and its failure mode as the trace tag `failure_mode`, so the Traces tab filters to one kind of
    failure: written with the trace itself where it is still held (`held`), else one by one. A verdict
    the judge could not give is a feedback with no value and the judge's error."""
    judge = AssessmentSource(source_type=AssessmentSourceType.LLM_JUDGE, source_id=result.judge or "judge")
    feedback, tags = defaultdict(list), {}
    for row in result.rows:
        if not row.get("trace_id"):
            continue
        if row.get("failure_mode"):
            tags[row["trace_id"]] = {FAILURE_MODE: row["failure_mode"]}
        for name in (*result.estimates, *result.unscored):
            unjudged = row.get(name) is None and name in JUDGED_METRICS and name in row
            if row.get(name) is None and not unjudged:
                continue
            source = judge if name in JUDGED_METRICS else AssessmentSource(source_type=AssessmentSourceType.CODE,
                                                                   source_id=f"pipelines.evaluation.scoring.{name}")
            rationale = row.get(f"{name}_rationale") or row.get("error") or None
            feedback[row["trace_id"]].append(Feedback(
                trace_id=row["trace_id"], name=name, value=row[name], source=source, rationale=rationale,
                error=AssessmentError(error_code="JUDGE_FAILED", error_message=rationale) if unjudged else None))
    if not feedback and not tags:
        return
    attached = trace_export.release(feedback, tags)  # also waits for traces still being exported
    for trace_id in set(feedback) | set(tags):
        if trace_id not in attached:  # written before (a Spark executor's, or not `held`)
            for assessment in feedback.get(trace_id, []):
                mlflow.log_assessment(trace_id, assessment)
            for key, value in tags.get(trace_id, {}).items():
                mlflow.set_trace_tag(trace_id, key, value)
