"""Where programs lose points and what their answers cost, as pure functions over per-example rows.

Failure modes sort each evaluated example into one class, the first that applies:

  failed          the program errored (LM error, unparseable output, empty answer)
  retrieval_miss  a retrieving program found none of the example's gold documents (needs `gold_doc_ids`)
  answer_miss     the primary score is below `scoring.miss_threshold`
  ok              the rest

Quality against cost: a variant is on the Pareto front when no other variant is at least as good on
both quality (higher) and cost (lower) and strictly better on one.
"""

from __future__ import annotations

from collections.abc import Sequence

FAILED, RETRIEVAL_MISS, ANSWER_MISS, OK = "failed", "retrieval_miss", "answer_miss", "ok"
FAILURE_MODES = (RETRIEVAL_MISS, ANSWER_MISS, OK, FAILED)  # the order they are drawn in
USAGE_METRICS = ("lm_calls_per_question", "tokens_per_question", "cost_per_1k_questions_usd")


def failure_mode(*, failed: bool, score: float | None, threshold: float, retrieved: Sequence | None,
                 gold: Sequence | None) -> str:
    """The class of one example; `retrieved` is None for a program that does not retrieve."""
    if failed:
        return FAILED
    if retrieved is not None and gold and not set(gold) & set(retrieved):
        return RETRIEVAL_MISS
    if score is not None and score < threshold:
        return ANSWER_MISS
    return OK


def failure_counts(rows: Sequence[dict]) -> dict[str, int]:
    """How many rows fall in each class (every class present, zeros included)."""
    counts = dict.fromkeys(FAILURE_MODES, 0)
    for row in rows:
        if row.get("failure_mode") in counts:
            counts[row["failure_mode"]] += 1
    return counts


def usage_means(rows: Sequence[dict]) -> dict[str, float | None]:
    """Per question, over the rows that were metered: LM calls, tokens (prompt + completion), and dollars
    per 1,000 questions (None when no call had a price)."""
    metered = [r for r in rows if r.get("lm_calls") is not None]
    if not metered:
        return {}
    n = len(metered)
    priced = [r["cost_usd"] for r in metered if r.get("cost_usd") is not None]
    calls, tokens, cost = USAGE_METRICS
    return {calls: sum(r["lm_calls"] for r in metered) / n,
            tokens: sum(r["prompt_tokens"] + r["completion_tokens"] for r in metered) / n,
            cost: 1000 * sum(priced) / n if priced else None}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For each (cost, quality) point, whether no other point dominates it (costs no more, scores no lower,
    and is strictly better on one)."""
    def dominates(a, b) -> bool:
        return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])

    return [not any(dominates(other, point) for other in points) for point in points]
