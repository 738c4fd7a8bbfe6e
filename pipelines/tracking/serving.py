"""Traces of a logged program answering outside the project's steps: in a user's process (loaded with
`mlflow.pyfunc.load_model`, handed to `mlflow.genai.evaluate`), behind `mlflow models serve`, in a
`spark_udf`.

Where they go is MLflow's own business: `MLFLOW_TRACKING_URI` and `MLFLOW_EXPERIMENT_ID` (or the
process's `mlflow.set_tracking_uri` / `set_experiment`). A pyfunc call links its traces to the LoggedModel
that answered (MLflow's prediction context carries the model id; the program's threads copy it). Export
is MLflow's asynchronous trace logging, so an answer never waits for the store; a trace the store does
not take is dropped, counted, and warned about once (`DroppedTraces`).

`RAGQA_TRACING=false` turns a loaded program's tracing off.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading

import mlflow
from mlflow.environment_variables import (
    MLFLOW_ENABLE_ASYNC_TRACE_LOGGING,
    MLFLOW_EXPERIMENT_ID,
    MLFLOW_EXPERIMENT_NAME,
)
from mlflow.utils.autologging_utils import get_autologging_config

log = logging.getLogger(__name__)

TRACING = "RAGQA_TRACING"                   # "false": a loaded program never traces
TRACE_EXECUTORS = "RAGQA_TRACE_EXECUTORS"   # "true": a Spark executor that traces (flushes after each batch)
OFF = ("false", "0", "no", "off")
# Where MLflow's exporter says it dropped a trace (the async queue's worker, or a full queue).
EXPORT_LOGGERS = ("mlflow.tracing.export.mlflow_v3", "mlflow.tracing.export.async_export_queue")
DROP_MARKS = ("Failed to send trace", "trace will be discarded", "Failed to log trace")


def tracing_on() -> bool:
    return os.environ.get(TRACING, "true").strip().lower() not in OFF


def start_tracing() -> bool:
    """Trace the program's calls (MLflow's DSPy spans), unless `RAGQA_TRACING=false`. DSPy autologging
    that the process has configured already (the project's steps, a user's notebook) is left as it is."""
    if not tracing_on() or not _pin_experiment():
        return False
    if get_autologging_config("dspy", "log_traces") is None:
        mlflow.dspy.autolog(log_traces=True, silent=True)
    DroppedTraces.install()
    if not MLFLOW_ENABLE_ASYNC_TRACE_LOGGING.get() and os.environ.get(TRACE_EXECUTORS) != "true":
        log.warning("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING=false: each answer waits until its trace is written, and "
                    "a slow or stopped tracking server holds it up; unset it to export in the background")
    return True


def _pin_experiment() -> bool:
    """Resolve `MLFLOW_EXPERIMENT_ID` (or `_NAME`) once, as the process's experiment. MLflow otherwise asks
    the tracking server for it at every span it starts, so a slow or stopped server would hold up every
    answer. False (tracing off, said once) when the server cannot name it now."""
    if mlflow.tracking.fluent._active_experiment_id or not (MLFLOW_EXPERIMENT_ID.get() or MLFLOW_EXPERIMENT_NAME.get()):
        return True  # chosen in code already, or MLflow's default experiment (no lookup per span)
    try:
        mlflow.set_experiment(experiment_name=MLFLOW_EXPERIMENT_NAME.get(), experiment_id=MLFLOW_EXPERIMENT_ID.get())
    except Exception as e:  # noqa: BLE001 - any failure to reach the store: answer without traces
        log.warning("tracing off: the experiment %s is not reachable at %s (%s); requests answer untraced",
                    MLFLOW_EXPERIMENT_ID.get() or MLFLOW_EXPERIMENT_NAME.get(), mlflow.get_tracking_uri(),
                    str(e).splitlines()[0][:200])
        return False
    return True


def flush_on_executor() -> None:
    """A Spark worker may be stopped before MLflow's export queue drains on its own."""
    if os.environ.get(TRACE_EXECUTORS) == "true":
        mlflow.flush_trace_async_logging()


class DroppedTraces(logging.Filter):
    """Counts the traces MLflow's exporter could not write; the first drop is one warning naming the store,
    the rest are counted, and the count is logged when the process ends."""

    _installed: DroppedTraces | None = None

    def __init__(self):
        super().__init__()
        self.count = 0
        self._lock = threading.Lock()

    @classmethod
    def install(cls) -> DroppedTraces:
        if cls._installed is None:
            cls._installed = cls()
            for name in EXPORT_LOGGERS:
                logging.getLogger(name).addFilter(cls._installed)
            atexit.register(cls._installed.report)
        return cls._installed

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno < logging.WARNING or not any(mark in message for mark in DROP_MARKS):
            return True
        with self._lock:
            self.count += 1
            first = self.count == 1
        if first:
            record.msg = (f"a request's trace was not written to {mlflow.get_tracking_uri()} ({message[:300]}); "
                          "answers are unaffected, later drops are counted and reported when the process ends")
            record.args = ()
        return first

    def report(self) -> None:
        if self.count:
            log.warning("%d traces were dropped: the tracking store did not take them", self.count)
