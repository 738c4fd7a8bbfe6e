"""Traces already in the store, scored after the fact: a run's (its evaluation), a version's served traffic,
or an experiment's. `mlflow.genai.evaluate(data=traces)` writes each scorer's assessment onto the traces
and this run; a run's traces get their gold answers and passages from the run's evaluation table."""

from __future__ import annotations

from datetime import datetime

import mlflow
import pandas as pd
from mlflow.tracing.constant import TraceMetadataKey

from pipelines.errors import ConfigError
from pipelines.tracking.evaluation import load_table
from pipelines.tracking.judging.labels import EVAL_TABLES, EXPECTATION
from pipelines.tracking.scorers import GOLD_DOCS

HOW_TO_TRACE = ("traces come from a step's evaluation (cot, rag, ... with tracking.log_traces=true), from a loaded "
                "program (mlflow.pyfunc.load_model) or from serving with MLFLOW_TRACKING_URI and "
                "MLFLOW_EXPERIMENT_ID set (README: served traffic)")


def _millis(when: str | None, key: str) -> int | None:
    if not when:
        return None
    try:
        return int(datetime.fromisoformat(str(when)).timestamp() * 1000)
    except ValueError:
        raise ConfigError(f"{key}={when}: not an ISO date or time (e.g. 2026-05-01 or 2026-05-01T12:00)") from None


def where(*, run_id: str | None, model_uri: str | None, experiment: str) -> tuple[str, str | None]:
    """The experiment whose traces are assessed (made the active one, so the assessments stay on those
    traces) and the version's model id for `model_uri`."""
    model_id = None
    if run_id:
        try:
            experiment_id = mlflow.get_run(run_id).info.experiment_id
        except mlflow.exceptions.MlflowException as e:
            raise ConfigError(f"no run {run_id}: {e.message.splitlines()[0]}") from None
    elif model_uri:
        from pipelines.tracking.models import logged_model_of

        model = logged_model_of(model_uri)
        if model is None:
            raise ConfigError(f"{model_uri} has no LoggedModel (logged before MLflow 3): no traffic is linked to it")
        experiment_id, model_id = model.experiment_id, model.model_id
    else:
        found = mlflow.get_experiment_by_name(experiment)
        if found is None:
            raise ConfigError(f"no experiment {experiment!r}: {HOW_TO_TRACE}")
        experiment_id = found.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id, model_id


def find_traces(*, experiment_id: str, run_id: str | None = None, model_id: str | None = None,
                since: str | None = None, until: str | None = None) -> list:
    """The traces to assess, oldest first; none is a one-line error that says how to get traces."""
    start, end = _millis(since, "since"), _millis(until, "until")
    filters = [f"trace.timestamp_ms >= {start}"] if start else []
    filters += [f"trace.timestamp_ms <= {end}"] if end else []
    traces = mlflow.search_traces(locations=[experiment_id], run_id=run_id, model_id=model_id,
                                  filter_string=" AND ".join(filters) or None, return_type="list",
                                  order_by=["timestamp_ms ASC"])
    if model_id:  # a version's traffic: not the traces of the evaluations that measured it
        traces = [t for t in traces if not t.info.request_metadata.get(TraceMetadataKey.SOURCE_RUN)]
    if not traces:
        what = f"run {run_id}" if run_id else f"model {model_id}" if model_id else f"experiment {experiment_id}"
        window = f" between {since or 'the start'} and {until or 'now'}" if since or until else ""
        raise ConfigError(f"{what} has no traces{window}: {HOW_TO_TRACE}")
    return traces


def expectations_of(traces: list, run_id: str | None) -> dict[str, dict]:
    """Each trace's gold answer and passages: its `expected_response` expectation, else (a run's traces) the
    run's evaluation table row."""
    rows = {}
    for table in EVAL_TABLES if run_id else ():
        rows.update({r["trace_id"]: r for r in load_table(run_id, table) or [] if r.get("trace_id")})
    found = {}
    for trace in traces:
        trace_id, row = trace.info.trace_id, rows.get(trace.info.trace_id, {})
        given = {a.name: a.value for a in trace.info.assessments or [] if getattr(a, "expectation", None) is not None}
        gold = given.get(EXPECTATION) or row.get("gold")
        docs = given.get(GOLD_DOCS) or row.get("gold_doc_ids")
        found[trace_id] = {k: v for k, v in ((EXPECTATION, gold), (GOLD_DOCS, docs)) if v}
    return found


def assess(traces: list, scorers: list, expectations: dict[str, dict]) -> dict[str, list[float]]:
    """`mlflow.genai.evaluate` of the traces with the scorers, inside the active run; each scorer's values
    (0-100: a judge's yes is 100, no is 0) over the traces where it gave one."""
    data = pd.DataFrame({"trace": traces,
                         "expectations": [expectations.get(t.info.trace_id) or None for t in traces]})
    if data["expectations"].isna().all():
        data = data.drop(columns="expectations")
    result = mlflow.genai.evaluate(data=data, scorers=scorers)
    values = {}
    for s in scorers:
        column = result.result_df.get(f"{s.name}/value")
        values[s.name] = [v for v in (_number(x) for x in (column if column is not None else [])) if v is not None]
    return values


def _number(value) -> float | None:
    if isinstance(value, bool):
        return 100.0 if value else 0.0
    if isinstance(value, str):
        return {"yes": 100.0, "no": 0.0}.get(value.strip().lower())
    if isinstance(value, (int, float)) and value == value:  # not NaN
        return float(value)
    return None
