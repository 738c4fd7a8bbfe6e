"""Evaluations against the fake OpenAI-compatible server: full rows, failures counted, every trace of a
many-threaded evaluation stored or its loss explained."""

import json
import time

import dspy
import mlflow
import pytest

from pipelines import tracking
from pipelines.config import compose
from pipelines.data import load_splits
from pipelines.errors import ConfigError
from pipelines.evaluation.judge import JudgedF1
from pipelines.evaluation.metrics import token_f1
from pipelines.evaluation.scoring import Scorer, Scoring, evaluate
from pipelines.lm import build_adapter, build_lm
from pipelines.steps.variant import run_variant

from fake_lm import fake_model, judge_fails
from helpers import fake_lm_overrides, fake_overrides, mlflow_run, smoke

METRICS = ["semantic_f1", "token_f1", "rouge_l"]


def fake_session(fake, mode="ok"):
    cfg = compose("cot", fake_lm_overrides(fake.api_base, model=fake_model(mode)))
    lm = build_lm(cfg.lm)
    return lm, build_adapter(cfg.lm), load_splits(cfg.data).dev[:3], Scorer(Scoring.from_cfg(cfg.scoring), JudgedF1(lm))


def test_good_answers_make_full_rows_on_the_0_100_scale(fake):
    lm, adapter, dev, scorer = fake_session(fake)
    with dspy.context(lm=lm, adapter=adapter):
        result = evaluate(dspy.ChainOfThought("question -> response"), dev, scorer, num_threads=2, progress=False)
    assert result.failed == 0 and result.judge_failures == 0
    assert result.score == pytest.approx(50.0)  # the fake judge says recall = precision = 0.5
    assert list(result.estimates) == METRICS
    row = result.rows[0]
    assert row["question"] == dev[0].question and row["gold"] == dev[0].response
    assert row["prediction"] == "fake response" and row["reasoning"] == "fake reasoning"
    assert row["semantic_f1"] == 50.0 and "precision 0.50, recall 0.50" in row["semantic_f1_rationale"]
    assert row["token_f1"] == token_f1("fake response", dev[0].response)
    assert "score" not in row and row["trace_id"] is None  # not traced: no trace id to attach metrics to
    assert result.estimates["semantic_f1"].half_width == 0.0  # every example judged alike


def test_lexical_metrics_are_identical_across_reruns(fake):
    lm, adapter, dev, scorer = fake_session(fake)
    runs = []
    for _ in range(2):
        with dspy.context(lm=lm, adapter=adapter):
            runs.append(evaluate(dspy.ChainOfThought("question -> response"), dev, scorer, num_threads=2,
                                 progress=False))
    for metric in ("token_f1", "rouge_l"):
        assert [r[metric] for r in runs[0].rows] == [r[metric] for r in runs[1].rows]
        assert runs[0].estimates[metric] == runs[1].estimates[metric]


@pytest.mark.parametrize("mode", ["garbage", "empty"])
def test_unparsable_or_empty_output_counts_as_failure_and_zero_in_every_metric(fake, mode):
    lm, adapter, dev, scorer = fake_session(fake, mode)
    with dspy.context(lm=lm, adapter=adapter):
        result = evaluate(dspy.ChainOfThought("question -> response"), dev, scorer, num_threads=2, progress=False)
    assert result.num_examples == 3 and result.failed == 3 and result.score == 0.0
    assert all(r["error"] for r in result.rows)
    assert all(r[m] == 0.0 for r in result.rows for m in METRICS)
    assert all(result.estimates[m].value == 0.0 for m in METRICS)
    assert fake.calls == 3  # the program's calls only: a failed answer is not sent to the judge


def traced_evaluation(store, fake, n: int, threads: int):
    """`n` cot examples at `threads` threads through the project's scoring step, traced."""
    from pipelines.steps.in_run import score
    from pipelines.steps.session import prepare

    cfg = compose("cot", [*fake_lm_overrides(fake.api_base, threads=threads),
                          f"tracking.artifact_location={store}/artifacts"])
    session = prepare(cfg)
    examples = (session.splits.train + session.splits.dev + session.splits.test)[:n]
    with tracking.run("traced", cfg) as active:
        score(session, dspy.ChainOfThought("question -> response"), examples, step="traced", split="dev",
              model=None)
    return mlflow.get_run(active.info.run_id)


def test_every_example_of_a_many_threaded_evaluation_is_traced(store, fake, monkeypatch):
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    # A slow store lines the 24 threads' exports up, each holding a pooled connection while it
    # asks for a second (as on a loaded host): with MLflow's default pool of 5 + 10 they starve.
    original = SqlAlchemyStore.get_experiment

    def slow_get_experiment(self, experiment_id):
        time.sleep(0.3)
        return original(self, experiment_id)

    monkeypatch.setattr(SqlAlchemyStore, "get_experiment", slow_get_experiment)
    run = traced_evaluation(store, fake, n=24, threads=24)  # starved exports time out after 30 s and are lost
    assert run.data.metrics["traces_logged"] == 24 and "traces_missing" not in run.data.tags


def test_traces_the_store_refuses_are_counted_and_explained(store, fake, monkeypatch, caplog):
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    original, calls = SqlAlchemyStore.start_trace, []

    def every_third_fails(self, trace_info):
        calls.append(trace_info)
        if len(calls) % 3 == 0:
            raise mlflow.exceptions.MlflowException("disk quota exceeded")
        return original(self, trace_info)

    monkeypatch.setattr(SqlAlchemyStore, "start_trace", every_third_fails)
    with caplog.at_level("WARNING", logger="pipelines.tracking"):
        run = traced_evaluation(store, fake, n=6, threads=1)
    assert run.data.metrics["traces_logged"] == 4
    assert "2 of 6 traces were not written" in run.data.tags["traces_missing"]
    assert "disk quota exceeded" in run.data.tags["traces_missing"] and "disk quota exceeded" in caplog.text


QUESTIONS = [f"how do I fix problem {i}?" for i in range(12)]


def arena_evaluation(fake, answers: dict, golds: dict, verdict, *overrides):
    """The answers scored against the golds on the arena metrics by a fake judge that says `verdict(question,
    answer_1, answer_2)` (token F1 decides, so a verdict left out never touches the primary metric)."""
    def judged(request):
        shown = str(request["messages"][-1]["content"])
        question = next(q for q in QUESTIONS if q in shown)
        one, two = shown.split("[[ ## answer_1 ## ]]", 1)[1].split("[[ ## answer_2 ## ]]", 1)
        return verdict(question, one, two.split("Respond with", 1)[0])

    fake.field_answers["verdict"] = judged
    fake.field_answers["response"] = lambda request: next((answers[q] for q in QUESTIONS
                                                           if q in str(request["messages"][-1]["content"])), None)
    cfg = compose("cot", [*fake_lm_overrides(fake.api_base, model=fake_model()), "scoring.primary=token_f1",
                          "scoring.metrics=[token_f1,arena_win_rate,arena_win_tie_rate]", *overrides])
    lm = build_lm(cfg.lm)
    scorer = Scorer.with_judges(Scoring.from_cfg(cfg.scoring), lm)
    dev = [dspy.Example(question=q, response=golds[q]).with_inputs("question") for q in QUESTIONS]
    with dspy.context(lm=lm, adapter=build_adapter(cfg.lm)):
        return evaluate(dspy.Predict("question -> response"), dev, scorer, num_threads=2, progress=False)


def test_the_arena_rates_count_what_a_pairwise_judge_says_in_either_order(fake):
    """A judge that prefers the answer saying `good`, wherever it is shown, and is not sure between two `good`s:
    with answers known to win, lose or tie, the rates are known, and the order rule shows the program's answer
    first on some questions and second on others."""
    from pipelines.evaluation import arena

    answers = {q: ("good fix", "bad fix", "good fix")[i % 3] for i, q in enumerate(QUESTIONS)}
    golds = {q: "plain reference" if i % 3 == 0 else "good reference" for i, q in enumerate(QUESTIONS)}
    assert {arena.program_first(q) for q in QUESTIONS} == {True, False}

    def verdict(question, one, two):
        return "0" if "good" in one and "good" in two else "1" if "good" in one else "2" if "good" in two else "0"

    result = arena_evaluation(fake, answers, golds, verdict)
    # Per question: "good" against a plain gold wins, "bad" against a good one loses, two goods tie.
    assert result.estimates["arena_win_rate"].value == pytest.approx(100 / 3, abs=1e-3)
    assert result.estimates["arena_win_tie_rate"].value == pytest.approx(200 / 3, abs=1e-3)
    row = result.rows[2]
    assert row["arena_win_rate"] == 0.0 and row["arena_win_tie_rate"] == 100.0
    assert "judge: 0 (not sure)" in row["arena_win_rate_rationale"] and "program's answer shown as" in row[
        "arena_win_rate_rationale"]
    assert result.judge_failures == 0 and "arena_order_flip_rate" not in result.estimates
    assert fake.calls == 2 * len(QUESTIONS)  # one answer, one verdict each


def test_few_shot_pairs_reach_the_judge_and_both_orders_measure_its_position_bias(fake, tmp_path):
    """Both orders, with the user's labelled pairs: every verdict request carries them. The judge prefers a
    `good` answer over a `bad` one wherever it stands, but between two answers alike it takes answer 1, so
    those flip with the order; and on one question it says something that is not a verdict, which leaves
    that question unscored instead of lost."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"question": "how do I undo a commit?", "answer_1": "git reset --soft HEAD~1",
                                 "answer_2": "delete .git", "verdict": 1, "reasoning": "two destroys the repo"}) + "\n")
    answers = {q: "good fix" if i % 2 else "bad fix" for i, q in enumerate(QUESTIONS)}
    golds = {q: "good reference" if i % 4 < 2 else "bad reference" for i, q in enumerate(QUESTIONS)}
    broken = QUESTIONS[5]

    def verdict(question, one, two):
        if question == broken:
            return "maybe"
        return "2" if "bad" in one and "good" in two else "1"

    result = arena_evaluation(fake, answers, golds, verdict, "scoring.arena.both_orders=true",
                              f"scoring.arena.examples={pairs}")
    judge_prompts = [p for p in fake.prompts if "answer_1" in p and "how do I fix problem" in p]
    assert len(judge_prompts) == 2 * len(QUESTIONS) - 1  # both orders; the broken one stops after its first
    assert all("two destroys the repo" in p and "delete .git" in p for p in judge_prompts)
    # i % 4: 0 bad vs good gold: lost both ways; 1 good vs good: a flip, a tie; 2 bad vs bad: a flip, a tie;
    # 3 good vs bad gold: won both ways. Question 5 (i % 4 == 1) is not scored.
    scored = [i for i in range(12) if i != 5]
    expected = {"arena_win_rate": [100.0 * (i % 4 == 3) for i in scored],
                "arena_win_tie_rate": [100.0 * (i % 4 != 0) for i in scored],
                "arena_order_flip_rate": [100.0 * (i % 4 in (1, 2)) for i in scored]}
    for metric, values in expected.items():
        assert [r[metric] for r in result.rows if r[metric] is not None] == values, metric
        assert result.estimates[metric].n == 11
        assert result.estimates[metric].value == pytest.approx(sum(values) / 11, abs=1e-3)
    assert result.rows[5]["arena_win_rate"] is None and result.judge_failures == 1
    assert "the judge gave no verdict" in result.rows[5]["arena_win_rate_rationale"]
    assert "the verdict changed with the order" in result.rows[1]["arena_order_flip_rate_rationale"]
    assert result.estimates["arena_order_flip_rate"].low < result.estimates["arena_order_flip_rate"].value


def test_a_bad_few_shot_file_stops_the_step_before_any_run(store, fake, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"question": "q", "answer_1": "a", "answer_2": "b", "verdict": "A"}\n')
    with pytest.raises(ConfigError, match=f"scoring.arena.examples={pairs}, row 1: verdict 'A' is not 1, 2 or 0"):
        run_variant(smoke("cot", store, *fake_overrides(fake), f"scoring.arena.examples={pairs}"))
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list") and fake.calls == 0


def test_cot_run_leaves_out_the_answers_its_judge_could_not_score(store, fake):
    """`mlflow run . -e cot` with a judge whose verdict does not parse on about half the questions (the fake's
    `judgefail0.5`, by a hash of the question) and gives F1 0.9 on the others: SemanticF1 is their mean, 90,
    over the scored examples only, with that n; the rest are counted and have their own failure mode."""
    overrides = ["experiment=smoke", "data.dev_size=24", *fake_overrides(fake, score=0.9, judge_fail=0.5),
                 "scoring.metrics=[semantic_f1,token_f1]", "scoring.primary=semantic_f1"]
    dev = load_splits(compose("cot", overrides).data).dev
    unjudged = {e.question for e in dev if judge_fails(e.question, 0.5)}
    assert 8 <= len(unjudged) <= 16  # about half of the 24 (11 on the sample data)
    proc = mlflow_run("cot", store, " ".join(overrides))
    assert proc.returncode == 0, proc.stderr[-4000:]
    client = mlflow.MlflowClient()
    (run,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
              if r.data.tags.get("step") == "cot"]
    metrics, scored = run.data.metrics, 24 - len(unjudged)
    assert metrics["judge_failures"] == len(unjudged) and metrics["failure_judge_failed"] == len(unjudged)
    assert metrics["semantic_f1"] == 90.0 and metrics["semantic_f1_n"] == scored  # not 90 * scored / 24
    assert metrics["num_examples"] == 24 and "token_f1_n" not in metrics and metrics["failed_examples"] == 0
    assert f"cot dev: SemanticF1 = 90.0 ± 0.0 (n={scored}), token F1 = " in proc.stderr + proc.stdout
    assert f"SemanticF1 = 90.0 ± 0.0 (95% CI, n={scored}), {len(unjudged)} of 24 examples unscored" in proc.stdout
    rows = json.loads(open(client.download_artifacts(run.info.run_id, "eval/dev_results.json")).read())
    rows = [dict(zip(rows["columns"], row, strict=True)) for row in rows["data"]]
    assert {r["question"] for r in rows if r["semantic_f1"] is None} == unjudged
    assert all(r["failure_mode"] == ("judge_failed" if r["question"] in unjudged else "ok") for r in rows)
    traces = mlflow.search_traces(locations=[run.info.experiment_id], return_type="list")
    assert sorted(t.info.tags["failure_mode"] for t in traces) == sorted(r["failure_mode"] for r in rows)
