"""`main` and `optimize` against a fake LM: intervals, paired deltas, comparison table and chart."""

import json

import mlflow

from pipelines.config import compose
from pipelines.evaluation.report import comparison_chart
from pipelines.evaluation.scoring import Scoring
from pipelines.steps.optimize import run_optimize
from pipelines.steps.pipeline import run_pipeline

from helpers import fake_overrides, smoke


def table(run_id, path):
    data = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{path}"))
    return [dict(zip(data["columns"], row, strict=True)) for row in data["data"]]


def test_main_pairs_every_variant_on_the_same_examples(store, caplog, fake):
    overrides = [f"tracking.artifact_location={store}/artifacts", "experiment=smoke", *fake_overrides(fake)]
    with caplog.at_level("INFO", logger="pipelines"):
        result = run_pipeline(smoke("main", store, *overrides, "steps=[cot,rag]"), overrides)
    metrics = mlflow.get_run(result.run_id).data.metrics
    for variant in ("cot", "rag"):
        assert metrics[f"{variant}_semantic_f1"] == 50.0  # the fake judge: precision = recall = 0.5
        assert metrics[f"{variant}_semantic_f1_ci_low"] == metrics[f"{variant}_semantic_f1_ci_high"] == 50.0
        assert f"{variant}_token_f1_ci_low" in metrics and f"{variant}_rouge_l_ci_high" in metrics
    # Both answer "fake response" to the same 3 questions: every paired difference is exactly 0.
    for metric in ("semantic_f1", "token_f1", "rouge_l"):
        assert metrics[f"rag_vs_cot_{metric}_delta"] == 0.0
        assert metrics[f"rag_vs_cot_{metric}_delta_ci_low"] == metrics[f"rag_vs_cot_{metric}_delta_ci_high"] == 0.0
        assert metrics[f"rag_vs_cot_{metric}_delta_p_value"] == 1.0
    rows = {r["variant"]: r for r in table(result.run_id, "comparison.json")}
    assert set(rows) == {"cot", "rag", "rag - cot"}
    assert rows["rag - cot"]["semantic_f1"] == 0.0 and rows["rag - cot"]["p_value"] == 1.0
    assert rows["cot"]["ci_low"] == 50.0 and rows["cot"]["n"] == 3
    assert "comparison.png" in {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id)}
    assert "cot: SemanticF1 = 50.0 ± 0.0 (95% CI, n=3)" in caplog.text
    assert "rag - cot: SemanticF1 +0.0 ± 0.0 (95% CI [0.0, 0.0], p=1.000, n=3)" in caplog.text


def test_chart_draws_error_bars_only_with_intervals():
    scoring = Scoring.from_cfg(compose("main", ["scoring.primary=semantic_f1"]).scoring)
    rows = [{"variant": "cot", "semantic_f1": 40.0, "ci_low": 30.0, "ci_high": 52.0, "n": 6},
            {"variant": "rag", "semantic_f1": 50.0, "ci_low": 41.0, "ci_high": 58.0, "n": 6}]
    ax = comparison_chart(rows, scoring).axes[0]
    segments = [seg for lines in ax.collections for seg in lines.get_segments()]  # the error bars
    assert sorted((s[0][1], s[1][1]) for s in segments) == [(30.0, 52.0), (41.0, 58.0)]
    no_interval = [{**r, "ci_low": None, "ci_high": None, "n": 1} for r in rows]
    assert not comparison_chart(no_interval, scoring).axes[0].collections


def test_one_dev_example_still_optimizes_and_registers_without_intervals(store, monkeypatch, fake):
    from pipelines.steps import optimize

    class Identity:  # MIPROv2 itself is exercised end to end; here only the scoring around it matters
        def compile(self, program, **kwargs):
            return program

    monkeypatch.setattr(optimize, "build_optimizer", lambda opt, metric: Identity())
    result = run_optimize(smoke("optimize", store, *fake_overrides(fake), "data.dev_size=1"))
    run = mlflow.get_run(result.run_id).data
    assert run.metrics["semantic_f1"] == 50.0 and "semantic_f1_ci_low" not in run.metrics
    assert run.metrics["semantic_f1_delta"] == 0.0 and "semantic_f1_delta_p_value" not in run.metrics
    assert "1 example" in run.tags["confidence_intervals"]
    champion = mlflow.MlflowClient().get_model_version_by_alias("ragqa-tech-smoke", "champion")
    assert str(champion.version) == result.version
    side = table(result.run_id, "eval/dev_side_by_side.json")
    assert {"baseline_semantic_f1", "optimized_semantic_f1", "delta"} <= set(side[0])


def test_main_whose_judge_scores_nothing_finishes_and_says_so_without_a_zero(store, caplog, fake):
    """A judge whose every verdict fails to parse: each step's run finishes with its failure counted, no
    SemanticF1 anywhere (no 0), the comparison and registry say no example was scored, nothing is promoted."""
    overrides = [f"tracking.artifact_location={store}/artifacts", "experiment=smoke",
                 *fake_overrides(fake, judge_fail=1.0), "scoring.primary=semantic_f1"]
    with caplog.at_level("INFO", logger="pipelines"):
        result = run_pipeline(smoke("main", store, *overrides, "steps=[cot,rag]"), overrides)
    parent = mlflow.get_run(result.run_id).data
    assert result.result.score is None and not [k for k in parent.metrics if "semantic_f1" in k]
    assert parent.tags["best_variant"] == "none: no step was scored on semantic_f1"
    assert parent.metrics["rag_vs_cot_token_f1_delta"] == 0.0  # the judge-free metrics compare as usual
    rows = {r["variant"]: r for r in table(result.run_id, "comparison.json")}
    assert set(rows) == {"cot", "rag"} and rows["cot"]["semantic_f1"] is None and rows["cot"]["n"] == 0
    for step in ("cot", "rag"):
        assert parent.metrics[f"{step}_failure_judge_failed"] == 3 and parent.metrics[f"{step}_failure_ok"] == 0
        (child,) = mlflow.search_runs(filter_string=f"tags.step = '{step}'", search_all_experiments=True,
                                      output_format="list")
        assert child.info.status == "FINISHED" and child.data.metrics["judge_failures"] == 3
        assert child.data.tags["semantic_f1"].startswith("not computed: no example scored")
        assert "no example scored" in child.data.tags["promotion_at_registration"]
        assert f"{step}: SemanticF1: no example scored: the judge gave no verdict on any of the 3" in caplog.text
    assert not mlflow.MlflowClient().get_registered_model("ragqa-tech-smoke").aliases  # no champion
    assert "rag - cot: SemanticF1" not in caplog.text
