"""Where programs fail and what they cost: failure modes, per-question usage, the Pareto front, and the
meter that counts a question's LM calls also when they come from DSPy's cache."""

import contextvars
import types
from concurrent.futures import ThreadPoolExecutor

import dspy
import pytest

from pipelines.config import compose
from pipelines.evaluation import meter
from pipelines.evaluation.analysis import failure_counts, failure_mode, pareto_front, usage_means
from pipelines.evaluation.scoring import Metered, Scorer, Scoring, result_row


@pytest.mark.parametrize("failed, score, retrieved, gold, expected", [
    (True, 0.0, [1], [1], "failed"),                # an error outranks everything
    (True, None, [1], [1], "failed"),
    (False, None, [1], [1], "judge_failed"),        # no verdict: neither a good nor a poor answer
    (False, 90.0, [1, 2], [3], "ok_without_gold"),  # a good answer is good, gold document or not
    (False, 10.0, [1, 2], [3], "retrieval_miss"),   # no gold document found, and a poor answer
    (False, 10.0, [1, 2], [2, 3], "answer_miss"),   # a gold document found, the answer scored low
    (False, 60.0, [1, 2], [2], "ok"),
    (False, 60.0, [], [2], "ok_without_gold"),      # retrieved nothing at all
    (False, 10.0, None, [2], "answer_miss"),        # a program that does not retrieve has no retrieval miss
    (False, 90.0, None, [2], "ok"),
    (False, 10.0, [1], None, "answer_miss"),        # nor does data without gold document ids
    (False, 90.0, [1], [], "ok"),
    (False, 50.0, [1], [], "ok"),                   # the threshold itself is not a miss
    (False, 50.0, [1], [2], "ok_without_gold"),
])
def test_failure_modes_cross_retrieval_with_the_answer_score(failed, score, retrieved, gold, expected):
    assert failure_mode(failed=failed, score=score, threshold=50.0, retrieved=retrieved, gold=gold) == expected


def test_each_row_gets_its_failure_mode_and_every_recall():
    scoring = Scoring.from_cfg(compose("multihop", ["scoring.metrics=[token_f1]", "scoring.primary=token_f1",
                                                    "scoring.miss_threshold=30"]).scoring)
    example = dspy.Example(question="q", response="git reset soft", gold_doc_ids=[3, 9]).with_inputs("question")
    pred = dspy.Prediction(reasoning="r", response="git reset soft", doc_ids=[1, 3, 9], hop_doc_ids=[[1, 3], [9, 1]],
                           context=["a", "b", "c"], queries=["q", "written"])
    names = ("token_f1", "recall_at_k", "recall_at_k_hop1", "recall_at_k_hop2")
    scored = Scorer(scoring).score(example, pred, names)
    assert scored.values == {"token_f1": 100.0, "recall_at_k": 100.0, "recall_at_k_hop1": 50.0,
                             "recall_at_k_hop2": 50.0}
    row = result_row(example, pred, scored, scoring, retrieves=True, usage={"lm_calls": 2, "prompt_tokens": 90,
                                                                           "completion_tokens": 10, "cost_usd": None})
    assert row["failure_mode"] == "ok" and row["queries"] == ["q", "written"] and row["recall_at_k_hop2"] == 50.0
    failed = result_row(example, None, None, scoring, retrieves=True)
    assert failed["failure_mode"] == "failed" and failed["recall_at_k"] == 0.0 and failed["lm_calls"] is None
    assert failure_counts([row, failed, {"failure_mode": "ok"}]) == {
        "ok": 2, "ok_without_gold": 0, "answer_miss": 0, "retrieval_miss": 0, "judge_failed": 0, "failed": 1}


def test_the_failure_chart_stacks_every_mode_with_its_count_and_a_legend_in_stack_order():
    from pipelines.evaluation.report import FAILURE_STYLES, failure_chart
    from pipelines.evaluation.result import EvalResult

    scoring = Scoring.from_cfg(compose("cot", ["scoring.primary=semantic_f1"]).scoring)
    counts = {"ok": 9, "ok_without_gold": 3, "answer_miss": 4, "retrieval_miss": 2, "judge_failed": 1, "failed": 1}
    rows = [{"question": f"{m}{i}", "semantic_f1": 1.0, "failure_mode": m} for m, n in counts.items() for i in range(n)]
    ax = failure_chart([("rag", EvalResult.from_rows(rows, scoring))]).axes[0]
    bars = ax.patches  # one per mode, drawn bottom up in FAILURE_MODES order
    assert [round(b.get_height(), 4) for b in bars] == [100 * n / 20 for n in counts.values()]
    assert [round(b.get_y(), 4) for b in bars] == [0.0, 45.0, 60.0, 80.0, 90.0, 95.0]
    assert bars[4].get_hatch() == "//" and len({b.get_facecolor() for b in bars}) == 6  # no two modes alike
    assert [t.get_text() for t in ax.texts] == ["9", "3", "4", "2", "", ""]  # 5% is too thin for its count
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [FAILURE_STYLES[m][1] for m in reversed(counts)] and legend[0] == "failed (program error)"


def test_usage_is_averaged_over_metered_questions_and_priced_only_where_known():
    rows = [{"lm_calls": 2, "prompt_tokens": 100, "completion_tokens": 20, "cost_usd": None},
            {"lm_calls": 4, "prompt_tokens": 300, "completion_tokens": 60, "cost_usd": None},
            {"lm_calls": None}]  # failed before any call was metered
    assert usage_means(rows) == {"lm_calls_per_question": 3.0, "tokens_per_question": 240.0,
                                 "cost_per_1k_questions_usd": None}
    rows[0]["cost_usd"], rows[1]["cost_usd"] = 0.001, 0.003
    assert usage_means(rows)["cost_per_1k_questions_usd"] == pytest.approx(2.0)
    assert usage_means([{"lm_calls": None}]) == {}


def test_the_pareto_front_keeps_what_nothing_beats_on_both():
    # (tokens, score): cheap and weak, dear and strong, dominated, a tie with the cheap one.
    points = [(100, 40.0), (900, 70.0), (1000, 60.0), (100, 40.0)]
    assert pareto_front(points) == [True, True, False, True]
    assert pareto_front([(5, 1.0)]) == [True] and pareto_front([]) == []


def fresh(prompt: int, completion: int, cost: float | None = None) -> dict:
    """The history entry of a fresh LiteLLM call, its counts filed in the response as ProjectLM files them."""
    response = types.SimpleNamespace(usage={"prompt_tokens": prompt, "completion_tokens": completion},
                                     _hidden_params={"response_cost": cost})
    meter.keep_usage(response)
    return {"usage": dict(response.usage), "cost": cost, "response": response}


def cached(entry: dict) -> dict:
    """The entry of the same call answered from DSPy's cache: usage cleared, response and cost kept."""
    return {"usage": {}, "cost": entry["cost"], "response": types.SimpleNamespace(
        usage={}, _hidden_params=entry["response"]._hidden_params)}


def test_a_question_is_metered_in_its_threads_and_cached_calls_cost_what_they_did():
    first = fresh(100, 10, cost=0.5)
    meter.record(first)  # outside a meter: counted nowhere
    native = {"usage": {}, "cost": None,  # DSPy's native engine: a cached response keeps its own usage
              "response": types.SimpleNamespace(usage=types.SimpleNamespace(input_tokens=7, output_tokens=3))}

    def member():
        meter.record(cached(first))

    def program(question):
        meter.record(fresh(50, 5))
        meter.record(native)
        with ThreadPoolExecutor(2) as pool:  # as an ensemble's members do: each in a copy of the context
            for f in [pool.submit(contextvars.copy_context().run, member) for _ in range(2)]:
                f.result()
        return dspy.Prediction(response=question)

    metered = Metered(program)
    metered(question="q1")
    usage = next(iter(metered.usage.values()))
    assert usage == {"lm_calls": 4, "prompt_tokens": 257, "completion_tokens": 28, "cost_usd": 1.0}


def test_a_failed_question_still_reports_the_calls_it_paid_for():
    def program(question):
        meter.record(fresh(40, 4))
        raise RuntimeError("parse error")

    metered = Metered(program)
    with pytest.raises(RuntimeError):
        metered(question="q")
    assert next(iter(metered.usage.values()))["lm_calls"] == 1
