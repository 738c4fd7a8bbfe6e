"""What a finetune logs: its loss per step as it trains, then its transcripts (a dataset of the run),
its size, time and memory, and its adapter (by hash: the adapter's bytes travel in the model's files)."""

from __future__ import annotations

from collections.abc import Callable

import mlflow
import pandas as pd
import ujson


def step_metric(key: str) -> Callable[[int, float], None]:
    """A `(step, value)` logger bound to the active run, callable from another thread (DSPy trains in one)."""
    run_id = mlflow.active_run().info.run_id
    return lambda step, value: mlflow.log_metric(key, value, step=step, run_id=run_id)


def log_finetune(provider) -> dict[str, str]:
    """Log each adapter the provider trained (or found trained) in this run; returns tags naming them."""
    tags = {}
    for model, (adapter, report) in provider.trained.items():
        metrics = {"finetune_adapter_bytes": adapter.stat().st_size, "finetune_cached": float(report is None)}
        if report is not None:
            metrics.update({f"finetune_{key}": float(getattr(report, key)) for key in
                            ("examples", "skipped", "tokens", "target_tokens", "epochs", "steps",
                             "trainable_parameters", "load_seconds", "train_seconds", "peak_memory_mb")})
            trained_tokens = max(report.tokens * report.epochs, 1)
            metrics["finetune_seconds_per_1k_tokens"] = 1e3 * report.train_seconds / trained_tokens
            if report.losses:
                metrics["finetune_final_loss"] = report.losses[-1]
        mlflow.log_metrics(metrics)
        tags.update({"finetuned_model": model, "adapter_sha256": adapter.stem})
    for model, transcripts in provider.transcripts.items():
        frame = pd.DataFrame({"messages": [ujson.dumps(t["messages"], ensure_ascii=False) for t in transcripts]})
        mlflow.log_input(mlflow.data.from_pandas(frame, name=f"finetune-{model.rsplit(':', 1)[-1]}"),
                         context="finetune")
    mlflow.set_tags(tags)
    return tags
