"""Traces written in bulk, their assessments with them.

MLflow 3.17 writes a trace as its spans end (`log_spans`), then its info in a second transaction that
finds the trace already there and merges into it, then each assessment in a transaction of its own.
`BulkTraceExporter` writes nothing before a trace's root span ends; then, for the traces of an
evaluation, it waits (`hold`) until the evaluation's metrics are known (`release`) and writes each
trace once: its info with its assessments in one transaction, and the spans of a batch of traces in
another.

MLflow has no public hook for the exporter, so `install()` replaces the class its tracer provider
builds the exporter from (`mlflow.tracing.export.mlflow_v3.MlflowV3SpanExporter`, read at each
provider setup) and the subclass relies on that exporter's `_export_traces`, `_log_trace` and
`_log_spans`; `tests/unit/test_trace_export.py` fails on an MLflow upgrade that moves any of them.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Sequence

import mlflow
from mlflow.entities import Assessment
from mlflow.tracing.constant import SpansLocation, TraceTagKey
from mlflow.tracing.export import mlflow_v3

MLflowExporter = mlflow_v3.MlflowV3SpanExporter
BATCH = 64  # traces whose spans are written in one transaction

# Finished traces waiting for their evaluation's assessments: (exporter, trace, prompts, workspace).
_held: list[tuple] | None = None
_lock = threading.Lock()


class BulkTraceExporter(MLflowExporter):
    _probed = False  # whether a write has found out if the store keeps spans (`_store_supports_log_spans`)

    def __init__(self, tracking_uri: str | None = None) -> None:
        super().__init__(tracking_uri)
        self._started: set[str] = set()  # traces whose info the store took: their spans may follow
        start_trace = self._client.start_trace

        def started(trace_info):
            stored = start_trace(trace_info)
            self._started.add(trace_info.trace_id)
            return stored

        self._client.start_trace = started

    def export(self, spans: Sequence) -> None:
        self._export_traces(spans)  # only root spans do anything: their trace is complete

    def _log_trace(self, trace, prompts, workspace: str | None = None) -> None:
        with _lock:
            if _held is not None:
                _held.append((self, trace, prompts, workspace))
                return
        self.write([(trace, prompts, workspace)])

    def write(self, traces: list[tuple]) -> None:
        """The spans of `traces` in one transaction, and each trace's info (with any assessments attached)
        in its own. Once the store is known to keep spans (the first write finds out), the infos go first,
        marked as having their spans in the store: a plain insert, where after the spans it would be a
        merge into the rows the spans made."""
        traces = [t for t in traces if t[0] is not None]
        if traces and not self._probed:  # one trace the slow way: spans first
            self._probed = True
            self._log_all_spans(traces[:1])
            super()._log_trace(*traces.pop(0))
        stored = []
        for trace, prompts, workspace in traces:
            if self._store_supports_log_spans:
                trace.info.tags[TraceTagKey.SPANS_LOCATION] = SpansLocation.TRACKING_STORE.value
            super()._log_trace(trace, prompts, workspace)  # a failure is logged there, and the trace dropped
            if trace.info.trace_id in self._started:
                self._started.discard(trace.info.trace_id)
                stored.append((trace, prompts, workspace))
        self._log_all_spans(stored)

    def _log_all_spans(self, traces: list[tuple]) -> None:
        if not self._store_supports_log_spans:
            return
        spans = defaultdict(list)
        for trace, _, workspace in traces:
            spans[(trace.info.experiment_id, workspace)].extend(trace.data.spans)
        for (experiment_id, workspace), batch in spans.items():
            self._log_spans(experiment_id, batch, workspace=workspace)


def install() -> None:
    """Make the tracer provider MLflow sets up next use `BulkTraceExporter`."""
    mlflow_v3.MlflowV3SpanExporter = BulkTraceExporter


def hold() -> None:
    """From now on, finished traces wait in memory until `release`."""
    global _held
    with _lock:
        if _held is None:
            _held = []


def release(assessments: dict[str, list[Assessment]], tags: dict[str, dict[str, str]] | None = None) -> set[str]:
    """Write the traces held since `hold`, each with its `assessments` and `tags` attached; returns the ids of
    the traces that took theirs (the others' are for the caller to log)."""
    global _held
    mlflow.flush_trace_async_logging()  # traces still in the export queue join the hold first
    with _lock:
        held, _held = _held or [], None
    attached = set()
    by_exporter = defaultdict(list)
    for exporter, trace, prompts, workspace in held:
        trace_id = trace.info.trace_id if trace is not None else None
        if trace_id in assessments or trace_id in (tags or {}):
            trace.info.assessments.extend(assessments.get(trace_id, []))
            trace.info.tags.update((tags or {}).get(trace_id, {}))
            attached.add(trace_id)
        by_exporter[exporter].append((trace, prompts, workspace))
    for exporter, traces in by_exporter.items():
        for start in range(0, len(traces), BATCH):
            exporter.write(traces[start:start + BATCH])
    return attached
