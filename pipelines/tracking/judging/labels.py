"""People's labels on traces: written as HUMAN feedback (the Assessments pane shows them beside the judge's),
read back by name, the evaluated example behind each labelled trace and its gold answer as an expectation,
review queues; the judge's agreement and an aligned judge."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
from mlflow.entities import AssessmentSource, AssessmentSourceType

from pipelines.errors import ConfigError
from pipelines.judging.labels import Label, coerce
from pipelines.tracking.evaluation import comparison_metrics, load_table, log_table

EVAL_TABLES = ("eval/dev_results.json", "eval/baseline_dev_results.json", "eval/test_results.json")
EXPECTATION = "expected_response"  # a trace's gold answer; MLflow's judge aligners read it under this name
GOLD_SOURCE = AssessmentSource(source_type=AssessmentSourceType.CODE, source_id="ragqa gold answer")


def check_traces(trace_ids: set[str]) -> None:
    """Every labelled trace exists in the store, or one line lists the unknown ones."""
    missing = sorted(t for t in trace_ids if _trace(t) is None)
    if missing:
        raise ConfigError(f"{len(missing)} labelled trace ids are not in the tracking store "
                          f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): check the file's "
                          "trace_id column and MLFLOW_TRACKING_URI")


def _trace(trace_id: str):
    try:
        return mlflow.get_trace(trace_id)
    except mlflow.exceptions.MlflowException:
        return None


def log_gold(rows: dict[str, dict]) -> int:
    """Each trace's gold answer as its expectation `expected_response` (a reviewer finds it under "View full
    trace"; MLflow's aligners read it), where the trace has none yet. Returns how many were written."""
    written = 0
    for trace_id, row in rows.items():
        trace = _trace(trace_id)
        if trace and not any(a.name == EXPECTATION for a in trace.info.assessments or []):
            mlflow.log_expectation(trace_id=trace_id, name=EXPECTATION, value=row["gold"], source=GOLD_SOURCE)
            written += 1
    return written


def log_labels(labels: list[Label], name: str) -> None:
    """Each label as HUMAN feedback named `name` on its trace, by its reviewer."""
    for label in labels:
        mlflow.log_feedback(trace_id=label.trace_id, name=name, value=label.value, rationale=label.rationale,
                            source=AssessmentSource(source_type=AssessmentSourceType.HUMAN, source_id=label.reviewer))


def human_labels(experiment: str, name: str) -> list[Label]:
    """Every HUMAN feedback named `name` on the named experiment's traces, one Label per reviewer and trace."""
    found = []
    exp = mlflow.get_experiment_by_name(experiment)
    for trace in mlflow.search_traces(locations=[exp.experiment_id], return_type="list", include_spans=False) \
            if exp else []:
        for assessment in trace.info.assessments or []:
            source = assessment.source
            if assessment.name == name and source and source.source_type == AssessmentSourceType.HUMAN \
                    and getattr(assessment, "feedback", None) is not None and assessment.valid is not False:
                value = coerce(assessment.feedback.value)  # the Review page's pass/fail, or a file's label
                if value is not None:
                    found.append(Label(trace.info.trace_id, value, source.source_id, assessment.rationale))
    return found


def labelled_rows(trace_ids: set[str]) -> dict[str, dict]:
    """The evaluation rows (question, gold, prediction, ...) of the traces, from the runs that logged them.
    A trace outside any run (served traffic) is a row when someone gave its gold answer (the expectation
    `expected_response`): the judge is measured against a reference answer, never without one."""
    by_run: dict[str, set[str]] = {}
    rows = {}
    for trace_id in trace_ids:
        trace = _trace(trace_id)
        run_id = trace and trace.info.request_metadata.get("mlflow.sourceRun")
        if run_id:
            by_run.setdefault(run_id, set()).add(trace_id)
        elif trace and (row := served_row(trace)):
            rows[trace_id] = row
    for run_id, wanted in by_run.items():
        for table in EVAL_TABLES:
            rows.update({r["trace_id"]: r for r in load_table(run_id, table) or [] if r.get("trace_id") in wanted})
    return rows


def served_row(trace) -> dict | None:
    """A served trace as an evaluation row: the question it was asked, the answer it gave and its gold answer;
    None without a gold answer or a question."""
    gold = next((a.value for a in trace.info.assessments or [] if a.name == EXPECTATION
                 and getattr(a, "expectation", None) is not None and a.valid is not False), None)
    inputs, outputs = _payload(trace.data.request), _payload(trace.data.response)
    if not gold or not isinstance(inputs.get("question"), str):
        return None
    return {"trace_id": trace.info.trace_id, "question": inputs["question"], "gold": gold,
            "prediction": outputs.get("response") or ""}


def _payload(text: str | None) -> dict:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def log_judge_agreement(found: list, *, rows: list[dict], unparseable: int, disagreeing: int,
                        confusion: list[dict] | None, reviewers=None) -> None:
    """The judge's agreement statistics with their intervals and n, the confusion table (yes/no labels), and
    every labelled trace, those where judge and people differ most first, with a link to the trace. Where
    reviewers labelled the same traces, their agreement with each other beside it (`reviewers_cohen_kappa`,
    its interval, `reviewers_shared_traces`): the ceiling the judge's kappa is read against."""
    metrics = {"judge_labelled_traces": len(rows), "judge_unparseable": unparseable,
               "labels_disagreeing_traces": disagreeing}
    for prefix, a in [*(("judge", a) for a in found), *([("reviewers", reviewers)] if reviewers else [])]:
        metrics[f"{prefix}_{a.name}"] = a.value
        if a.low is not None:
            metrics.update({f"{prefix}_{a.name}_ci_low": a.low, f"{prefix}_{a.name}_ci_high": a.high})
    if reviewers:
        metrics["reviewers_shared_traces"] = reviewers.n
    mlflow.log_metrics(metrics)
    gap = sorted(rows, key=lambda r: -abs(float(r["human"]) - r["judge_score"]))
    log_table(gap, "judge/disagreements.json")
    if confusion:
        log_table(confusion, "judge/confusion.json")


def log_aligned_judge(aligned, comparison, *, held_out: int, aligned_on: int) -> str:
    """The aligned judge's state (DSPy JSON: instructions and demos) as the run's `judge/aligned.json`, and
    its held-out agreement against the original's, paired; returns the URI `scoring.judge=` takes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "aligned.json"
        aligned.judge.save(str(path))
        mlflow.log_artifact(str(path), "judge")
    mlflow.log_metrics({"align_examples": aligned_on, "align_held_out": held_out,
                        "align_demos": sum(len(p.demos) for p in aligned.predictors()),
                        **comparison_metrics({"align_heldout_agreement": comparison})})
    uri = f"runs:/{mlflow.active_run().info.run_id}/judge/aligned.json"
    mlflow.set_tag("aligned_judge", uri)
    return uri


def queue_for_review(run_id: str, label_name: str, instruction: str) -> tuple[str, int]:
    """Put a run's dev traces into a new review queue of its experiment, with the pass/fail label schema
    `label_name` (created once per experiment), so people label them on the experiment's Review page;
    each trace carries its gold answer as an expectation. Returns (queue name, items added: 0 when the run
    was queued before)."""
    run = mlflow.get_run(run_id)
    rows = {r["trace_id"]: r for r in load_table(run_id, EVAL_TABLES[0]) or [] if r.get("trace_id")}
    if not rows:
        raise ConfigError(f"run {run_id} has no traced dev evaluation ({EVAL_TABLES[0]} with trace ids) to review")
    name = f"{run.info.run_name} {run_id[:8]}"
    return _queue(run.info.experiment_id, name, list(rows), label_name, instruction, gold=rows)


def queue_traffic_for_review(model_id: str, label_name: str, instruction: str) -> tuple[str, int]:
    """Put the served traffic of a version (the traces linked to its LoggedModel outside any run) into a
    review queue, as `queue_for_review` does; a reviewer who knows the right answer adds it as the trace's
    `expected_response`, which the judge step needs to measure the trace."""
    model = mlflow.get_logged_model(model_id)
    traces = mlflow.search_traces(locations=[model.experiment_id], model_id=model_id, return_type="list",
                                  include_spans=False)
    served = [t.info.trace_id for t in traces if not t.info.request_metadata.get("mlflow.sourceRun")]
    if not served:
        raise ConfigError(f"model {model.name} ({model_id}) has no served traces to review: serve it with "
                          "MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_ID set (README: served traffic)")
    name = f"{model.name} traffic {model_id[-8:]} {len(served)}"
    return _queue(model.experiment_id, name, served, label_name, instruction, gold={})


def _queue(experiment: str, name: str, trace_ids: list[str], label_name: str, instruction: str, *,
           gold: dict[str, dict]) -> tuple[str, int]:
    from mlflow.genai import label_schemas, review_queues

    if any(q.name.lower() == name.lower() for q in review_queues.list_review_queues(experiment_id=experiment)):
        return name, 0  # queued before: its queue keeps its items and the labels given there
    log_gold(gold)
    schemas = {s.name: s for s in label_schemas.list_label_schemas(experiment_id=experiment)}
    schema = schemas.get(label_name) or label_schemas.create_label_schema(
        label_name, type="feedback", input=label_schemas.InputPassFail(positive_label="pass", negative_label="fail"),
        instruction=instruction,
        enable_comment=True, experiment_id=experiment)
    queue = review_queues.create_review_queue(name, queue_type="custom", schema_ids=[schema.schema_id],
                                              experiment_id=experiment)
    review_queues.add_items_to_review_queue(queue.queue_id, item_ids=trace_ids)
    return name, len(trace_ids)
