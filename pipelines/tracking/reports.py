"""What a step logs beside its evaluations: the index it retrieved from, the optimize run's
side-by-side and learned program, an ensemble's members, `main`'s comparison of its steps with where
they fail and what they cost, a prediction job's output."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dspy
import mlflow

from pipelines.tracking.evaluation import log_table

if TYPE_CHECKING:
    from pipelines.scale.batch import Predictions


def log_index(path: Path, build_info: dict[str, Any]) -> None:
    """Which index the run retrieved from (its cache key, size, how it was got). The index itself is
    stored once, in the files of the model the run logs, not again as a run artifact."""
    mlflow.log_params({"index.key": path.name})
    mlflow.log_metrics({"index_passages": build_info["passages"], "index_embedded_texts": build_info["embedded"],
                        "time_index_s": round(build_info["seconds"], 3)})
    mlflow.set_tag("index.cache", "hit" if build_info["cache_hit"] else "built")


def log_optimization(optimized: dspy.Module, *, side_by_side: list[dict], learned_prompt: str) -> None:
    """Both programs' answers to each dev question, and the learned instructions and demos, as DSPy's
    own JSON (`program/program.json`) and readable (`program/learned_prompt.md`)."""
    log_table(side_by_side, "eval/dev_side_by_side.json")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "program.json"
        optimized.save(str(path))
        mlflow.log_artifact(str(path), "program")
    mlflow.log_text(learned_prompt, "program/learned_prompt.md")


def log_predictions(predictions: Predictions, *, output: Path, output_format: str, executors: int) -> None:
    """A batch prediction job's counts, speed, where its output went, and a sample of it."""
    mlflow.log_metrics({"rows": predictions.rows, "failed_rows": predictions.failed, "executors": executors,
                        "rows_per_second": round(predictions.rows / max(predictions.seconds, 1e-9), 3),
                        "time_predict_s": round(predictions.seconds, 3)})
    mlflow.set_tags({"output": str(output), "output_format": output_format})
    log_table(predictions.sample.to_dict(orient="records"), "predictions/sample.json")


def log_comparison(*, metrics: dict[str, float], rows: list[dict], chart, best_variant: str) -> None:
    """`main`'s comparison of its steps: scores and paired differences as metrics, `comparison.json`,
    `comparison.png` and the `best_variant` tag."""
    mlflow.log_metrics(metrics)
    log_table(rows, "comparison.json")
    mlflow.log_figure(chart, "comparison.png")
    mlflow.set_tag("best_variant", best_variant)


def log_ensemble(ensemble) -> None:
    """Who answers in an ensemble run: N, each member's label (a model version, a candidate's rank and score,
    a sample's rollout), and the reducer."""
    mlflow.log_metric("ensemble_members", len(ensemble.members))
    labels = [m.label for m in ensemble.members]
    mlflow.set_tags({"ensemble.members": "; ".join(labels)[:5000], "ensemble.reducer": str(ensemble.reducer)})
    log_table([{"member": i, "label": m.label, "rollout": m.rollout, "temperature": m.temperature,
                "lm": m.answer_lm.model} for i, m in enumerate(ensemble.members)], "ensemble/members.json")


def log_analysis(*, failures, costs: list[dict], cost_chart) -> None:
    """`main`'s (or a sweep's) failure modes per variant and quality against cost: charts and table."""
    if failures is not None:
        mlflow.log_figure(failures, "failure_modes.png")
    if costs:
        log_table(costs, "quality_cost.json")
        mlflow.log_figure(cost_chart, "quality_cost.png")
