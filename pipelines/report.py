"""What runs show a reader: side-by-side tables, readable prompts, the comparison table and chart."""

from __future__ import annotations

import json
from typing import Any

import dspy

from pipelines.scoring import LABELS, EvalResult, Scoring
from pipelines.stats import Estimate, tidy


def side_by_side(base: EvalResult, best: EvalResult) -> list[dict]:
    """Both answers to each dev question with their primary scores (same examples, same order)."""
    metric = best.primary
    return [{"question": b["question"], "gold": b["gold"], "baseline_answer": b["prediction"],
             f"baseline_{metric}": b[metric], "optimized_answer": o["prediction"], f"optimized_{metric}": o[metric],
             "delta": tidy(o[metric] - b[metric])} for b, o in zip(base.rows, best.rows, strict=True)]


def describe_program(program: dspy.Module) -> str:
    """Readable instructions and demos of every predictor."""
    parts = []
    for name, predictor in program.named_predictors():
        parts.append(f"## {name}\n\n### Instructions\n\n{predictor.signature.instructions}\n")
        for i, demo in enumerate(predictor.demos, start=1):
            parts.append(f"### Demo {i}\n\n```json\n{json.dumps(dict(demo), indent=2, default=str)}\n```\n")
    return "\n".join(parts)


def comparison_row(estimate, metric: str) -> dict[str, Any]:
    """A score (or a paired difference) with its interval, as columns of `comparison.json`."""
    return {metric: estimate.value, "ci_low": estimate.low, "ci_high": estimate.high, "n": estimate.n}


def comparison_chart(rows: list[dict], scoring: Scoring):
    """One bar per variant, its confidence interval as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = scoring.primary
    fig, ax = plt.subplots(figsize=(6, 4))
    # Score ± half-width under each name, clear of the error bars.
    names = [f"{r['variant']}\n{Estimate(value=r[metric], n=r['n'], low=r['ci_low'], high=r['ci_high'])}"
             for r in rows]
    scores = [r[metric] for r in rows]
    yerr = None  # fewer than 2 examples: no bars rather than fake zero-width ones
    if all(r["ci_low"] is not None for r in rows):
        yerr = [[max(0.0, r[metric] - r["ci_low"]) for r in rows], [max(0.0, r["ci_high"] - r[metric]) for r in rows]]
    palette = ["#9aa5b1", "#5b8def", "#2f6f4f", "#c2703d"]
    ax.bar(names, scores, yerr=yerr, capsize=6, color=[palette[i % len(palette)] for i in range(len(rows))])
    ax.set_ylabel(f"{LABELS[metric]} (dev, n={rows[0]['n']}, {scoring.confidence:.0%} CI)")
    ax.set_ylim(0, 100)
    ax.set_title(" -> ".join(r["variant"] for r in rows))
    fig.tight_layout()
    return fig
