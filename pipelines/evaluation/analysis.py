"""Where programs lose points and what their answers cost, as pure functions over per-example rows.

Failure modes sort each evaluated example into one class, on two axes: did retrieval find a gold
document (where the program retrieves and the example has `gold_doc_ids`), and did the answer reach
`scoring.miss_threshold` on the primary metric?

  failed           the program errored (LM error, unparseable output, empty answer)
  judge_failed     the judge could not score the primary metric (its verdict did not parse): no verdict
                   on the answer either way, so it is left out of the metric's mean
  ok               a good answer, with a gold document retrieved or nothing to check that against
  ok_without_gold  a good answer although retrieval found none of the gold documents
  answer_miss      a poor answer although a gold document was retrieved, or with nothing to check
                   retrieval against (a program that does not retrieve, data without gold ids)
  retrieval_miss   a poor answer, and retrieval found none of the gold documents

Quality against cost: a variant is on the Pareto front when no other variant is at least as good on
both quality (higher) and cost (lower) and strictly better on one.
"""

from __future__ import annotations

from collections.abc import Sequence

FAILED, JUDGE_FAILED = "failed", "judge_failed"
OK, OK_WITHOUT_GOLD, ANSWER_MISS, RETRIEVAL_MISS = "ok", "ok_without_gold", "answer_miss", "retrieval_miss"
FAILURE_MODES = (OK, OK_WITHOUT_GOLD, ANSWER_MISS, RETRIEVAL_MISS, JUDGE_FAILED, FAILED)  # drawn bottom up
USAGE_METRICS = ("lm_calls_per_question", "tokens_per_question", "cost_per_1k_questions_usd")


def failure_mode(*, failed: bool, score: float | None, threshold: float, retrieved: Sequence | None,
                 gold: Sequence | None) -> str:
    """The class of one example. `score` is its primary score, None when the judge could not give one;
    `retrieved` is None for a program that does not retrieve."""
    if failed:
        return FAILED
    if score is None:
        return JUDGE_FAILED
    found = None if retrieved is None or not gold else bool(set(gold) & set(retrieved))
    if score >= threshold:
        return OK_WITHOUT_GOLD if found is False else OK
    return RETRIEVAL_MISS if found is False else ANSWER_MISS


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
