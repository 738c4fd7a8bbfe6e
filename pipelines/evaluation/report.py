"""What runs show a reader: side-by-side tables, readable prompts, the comparison table and chart, where
each variant fails, and its quality against its cost."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

import dspy

from pipelines.evaluation.analysis import FAILURE_MODES, pareto_front
from pipelines.evaluation.metrics import label
from pipelines.evaluation.result import EvalResult, compare
from pipelines.evaluation.scoring import Scoring
from pipelines.evaluation.stats import Comparison, Estimate, tidy

PALETTE = ["#9aa5b1", "#5b8def", "#2f6f4f", "#c2703d", "#8e5ba6", "#c9a227", "#3a8f9e", "#b3475b"]
# Good answers green, poor ones warm, no verdict grey (hatched: not the program's score), errors dark red.
FAILURE_STYLES = {
    "ok": ("#2f6f4f", "ok", None),
    "ok_without_gold": ("#8cc084", "ok without a gold doc retrieved", None),
    "answer_miss": ("#e3b448", "answer miss (gold doc retrieved or none to check)", None),
    "retrieval_miss": ("#c2703d", "retrieval miss (no gold doc, poor answer)", None),
    "judge_failed": ("#c9ced4", "judge failed (unscored)", "//"),
    "failed": ("#8b1e2d", "failed (program error)", None),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def side_by_side(base: EvalResult, best: EvalResult) -> list[dict]:
    """Both answers to each dev question with their primary scores (same examples, same order)."""
    metric = best.primary
    return [{"question": b["question"], "gold": b["gold"], "baseline_answer": b["prediction"],
             f"baseline_{metric}": b[metric], "optimized_answer": o["prediction"], f"optimized_{metric}": o[metric],
             "delta": None if b[metric] is None or o[metric] is None else tidy(o[metric] - b[metric])}
            for b, o in zip(base.rows, best.rows, strict=True)]


def describe_program(program: dspy.Module) -> str:
    """Readable instructions and demos of every predictor."""
    parts = []
    for name, predictor in program.named_predictors():
        parts.append(f"## {name}\n\n### Instructions\n\n{predictor.signature.instructions}\n")
        for i, demo in enumerate(predictor.demos, start=1):
            parts.append(f"### Demo {i}\n\n```json\n{json.dumps(dict(demo), indent=2, default=str)}\n```\n")
    return "\n".join(parts)


def comparison_row(estimate, metric: str) -> dict[str, Any]:
    """A score (or a paired difference) with its interval, as columns of `comparison.json`; no score and
    n=0 for a variant no example was scored on."""
    if estimate is None:
        return {metric: None, "ci_low": None, "ci_high": None, "n": 0}
    return {metric: estimate.value, "ci_low": estimate.low, "ci_high": estimate.high, "n": estimate.n}


@dataclass(frozen=True, kw_only=True)
class Pairwise:
    """Two variants scored on the same examples, compared example by example on each metric."""

    new: str
    old: str
    comparisons: dict[str, Comparison]

    def row(self, metric: str) -> dict[str, Any] | None:
        """The comparison table's row for the difference on `metric`; None where no example was scored
        on both sides."""
        found = self.comparisons.get(metric)
        if found is None:
            return None
        return {"variant": f"{self.new} - {self.old}", **comparison_row(found.delta, metric), "p_value": found.p_value}


def pairwise(results: list[tuple[str, EvalResult]], scoring: Scoring) -> list[Pairwise]:
    """Every later variant against every earlier one (`new - old`), in the order they ran."""
    return [Pairwise(new=new, old=old, comparisons=compare(new_result, old_result, scoring))
            for (old, old_result), (new, new_result) in itertools.combinations(results, 2)]


def comparison_chart(rows: list[dict], scoring: Scoring):
    """One bar per variant, its confidence interval as an error bar; a variant no example was scored on has
    no bar, and says so."""
    plt = _pyplot()
    metric = scoring.primary
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows)), 4))
    n = max(r["n"] for r in rows)
    # Score ± half-width under each name, clear of the error bars; n where fewer examples were scored.
    names = [f"{r['variant']}\nno example scored" if r[metric] is None else
             f"{r['variant']}\n{Estimate(value=r[metric], n=r['n'], low=r['ci_low'], high=r['ci_high'])}"
             + (f"\nn={r['n']}" if r["n"] != n else "") for r in rows]
    scores = [float("nan") if r[metric] is None else r[metric] for r in rows]  # unscored: no bar, never a 0
    # Fewer than 2 examples or no score: no error bar (NaN, or none at all) rather than a fake zero-width one.
    yerr = None if all(r["ci_low"] is None for r in rows) else [
        [float("nan") if r["ci_low"] is None else max(0.0, r[metric] - r["ci_low"]) for r in rows],
        [float("nan") if r["ci_high"] is None else max(0.0, r["ci_high"] - r[metric]) for r in rows]]
    ax.bar(names, scores, yerr=yerr, capsize=6, color=[PALETTE[i % len(PALETTE)] for i in range(len(rows))])
    ax.set_ylabel(f"{label(metric)} (dev, n={n}, {scoring.confidence:.0%} CI)")
    ax.set_ylim(0, 100)
    ax.set_title(" -> ".join(r["variant"] for r in rows))
    fig.tight_layout()
    return fig


def failure_chart(results: list[tuple[str, EvalResult]]):
    """One stacked bar per variant: the share of its examples in each failure mode (`analysis.py`), good
    answers at the bottom; each part large enough to hold it is labelled with its count."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(results)) + 3.0, 4))
    names = [name for name, _ in results]
    bottoms = [0.0] * len(results)
    for mode in FAILURE_MODES:
        color, text, hatch = FAILURE_STYLES[mode]
        counts = [r.failure_counts[mode] for _, r in results]
        shares = [100 * c / max(r.num_examples, 1) for c, (_, r) in zip(counts, results, strict=True)]
        bars = ax.bar(names, shares, bottom=bottoms, label=text, color=color, hatch=hatch, edgecolor="white",
                      linewidth=0.5)
        ax.bar_label(bars, labels=[str(c) if s >= 6 else "" for c, s in zip(counts, shares, strict=True)],
                     label_type="center", fontsize=8, color="white" if mode in ("ok", "failed") else "black")
        bottoms = [b + v for b, v in zip(bottoms, shares, strict=True)]
    n = results[0][1].num_examples if results else 0
    ax.set_ylabel(f"share of dev examples, % (n={n})")
    ax.set_ylim(0, 100)
    handles, texts = ax.get_legend_handles_labels()  # top of the legend = top of the stack
    ax.legend(handles[::-1], texts[::-1], loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)
    ax.set_title("where each variant fails")
    fig.tight_layout()
    return fig


def quality_cost_rows(results: list[tuple[str, EvalResult]], metric: str) -> list[dict[str, Any]]:
    """Per variant: the primary score with its interval, LM calls, tokens and dollars per question, and
    whether no other variant beats it on both quality and tokens (`pareto`)."""
    rows = []
    for name, result in results:
        usage = result.usage
        if not usage or metric not in result.estimates:  # unmetered, or no example scored on the metric
            continue
        rows.append({"variant": name, **comparison_row(result.estimates[metric], metric),
                     **{key: None if v is None else round(v, 4) for key, v in usage.items()}})
    return mark_pareto(rows, metric)


def mark_pareto(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """`rows` (a variant each, with `metric` and `tokens_per_question`), each marked `pareto` when no other
    row has at least its score for at most its tokens and is better in one."""
    front = pareto_front([(r["tokens_per_question"], r[metric]) for r in rows])
    return [{**row, "pareto": on_front} for row, on_front in zip(rows, front, strict=True)]


def quality_cost_chart(rows: list[dict[str, Any]], scoring: Scoring):
    """Each variant's primary score (with its interval) against its LM tokens per question; the variants no
    other beats on both are filled and joined, the others hollow; dollars per 1,000 questions where known."""
    plt = _pyplot()
    metric = scoring.primary
    fig, ax = plt.subplots(figsize=(7, 4.5))
    notes: dict[tuple[float, float], list[str]] = {}  # variants at the same point share one label
    for i, row in enumerate(rows):
        color = PALETTE[i % len(PALETTE)]
        low, high = row["ci_low"], row["ci_high"]
        yerr = None if low is None else [[max(0.0, row[metric] - low)], [max(0.0, high - row[metric])]]
        ax.errorbar([row["tokens_per_question"]], [row[metric]], yerr=yerr, fmt="o", capsize=5, color=color,
                    markerfacecolor=color if row["pareto"] else "white", markersize=9)
        cost = row.get("cost_per_1k_questions_usd")
        notes.setdefault((row["tokens_per_question"], row[metric]), []).append(
            row["variant"] + ("" if cost is None else f" (${cost:.2f}/1k q)"))
    for point, names in notes.items():
        ax.annotate("\n".join(names), point, textcoords="offset points", xytext=(8, 6), fontsize=8)
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["tokens_per_question"])
    if len(front) > 1:
        ax.plot([r["tokens_per_question"] for r in front], [r[metric] for r in front], "--", color="#555555",
                linewidth=1)
    ax.set_xlabel("LM tokens per question (prompt + completion)")
    n = rows[0]["n"] if rows else 0
    ax.set_ylabel(f"{label(metric)} (dev, n={n}, {scoring.confidence:.0%} CI)")
    ax.set_xlim(0, 1.2 * max((r["tokens_per_question"] for r in rows), default=1))
    top = max((r["ci_high"] if r["ci_high"] is not None else r[metric] for r in rows), default=100)
    ax.set_ylim(0, min(100.0, 1.25 * top + 5))  # the scores' own range: small differences stay visible
    ax.set_title("quality against cost\n(filled: no other variant scores higher for fewer tokens)", fontsize=10)
    fig.tight_layout()
    return fig
