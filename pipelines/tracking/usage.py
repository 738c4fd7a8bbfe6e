"""What a block of a step costs, as run metrics: its LM calls' tokens and dollars, per LM, and its wall time."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import dspy
import mlflow

log = logging.getLogger(__name__)


@contextlib.contextmanager
def usage(lm: dspy.LM, *, prefix: str = "", **others: dspy.LM | None) -> Iterator[None]:
    """Log tokens and cost of the calls made inside the block, also when it fails: `lm`'s as
    `<prefix>prompt_tokens`, `<prefix>completion_tokens`, `<prefix>cost_usd`; each other distinct LM's with
    its name as prefix (`judge_prompt_tokens`, `teacher_cost_usd`). An LM that is `lm` itself, or None, is
    skipped."""
    lms = {prefix: lm}
    for name, other in others.items():
        if other is not None and all(other is not seen for seen in lms.values()):
            lms[f"{name}_"] = other
    # The last entry, not an index: DSPy trims each LM's history at settings.max_history_size.
    marks = {prefix: (model.history[-1] if model.history else None) for prefix, model in lms.items()}
    try:
        yield
    finally:
        metrics = {}
        for prefix, model in lms.items():
            metrics.update(_usage_metrics(_calls_after(model.history, marks[prefix]), prefix))
        mlflow.log_metrics(metrics)


@contextlib.contextmanager
def timed(phase: str) -> Iterator[None]:
    """The block's wall time as the run metric `time_<phase>_s`, also when it fails."""
    started = time.monotonic()
    try:
        yield
    finally:
        mlflow.log_metric(f"time_{phase}_s", round(time.monotonic() - started, 3))


def _calls_after(history: list[dict], mark: dict | None) -> list[dict]:
    for i in range(len(history) - 1, -1, -1):
        if history[i] is mark:
            return history[i + 1:]
    if mark is not None:
        log.warning("LM history was trimmed during the run (dspy max_history_size=%d): token counts "
                    "cover the last %d calls only", dspy.settings.max_history_size, len(history))
    return history


def _usage_metrics(calls: list[dict], prefix: str) -> dict[str, float]:
    prompt = completion = 0
    cost = 0.0
    for entry in calls:
        counts = entry.get("usage") or {}
        prompt += int(counts.get("prompt_tokens") or 0)
        completion += int(counts.get("completion_tokens") or 0)
        cost += float(entry.get("cost") or 0.0)
    return {f"{prefix}prompt_tokens": prompt, f"{prefix}completion_tokens": completion, f"{prefix}cost_usd": cost}
