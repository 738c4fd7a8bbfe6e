"""How far to trust the judge: labels imported from a file onto an evaluation's traces (as HUMAN feedback),
the judge's agreement with them, and bad label files stopped before any run."""

import mlflow
import pytest
from mlflow.entities import AssessmentSourceType

from pipelines.config import ConfigError, compose
from pipelines.steps import run_judge, run_variant
from pipelines.tracking import load_table

from helpers import fake_overrides, smoke


def test_imported_labels_reach_the_traces_and_the_judges_agreement_is_measured(store, fake, tmp_path):
    evaluated = run_variant(smoke("cot", store, *fake_overrides(fake, score=0.7), "data.dev_size=6"))
    traces = [r["trace_id"] for r in load_table(evaluated.run_id, "eval/dev_results.json")]
    assert len(traces) == 6 and all(traces)
    # The fake judge passes every answer (SemanticF1 0.7 >= 0.5): it agrees with the 4 yes labels only.
    rows = [f"{t},{'yes' if i < 4 else 'no'},,ann" for i, t in enumerate(traces)] + [f"{traces[0]},no,looks off,bob",
                                                                                    f"{traces[0]},yes,,cy"]
    labels_file = tmp_path / "labels.csv"
    labels_file.write_text("trace_id,label,rationale,reviewer\n" + "\n".join(rows) + "\n")
    judged = run_judge(compose("judge", [*fake_overrides(fake, score=0.7), f"labels={labels_file}",
                                         f"tracking.artifact_location={store}/artifacts"]))
    run = mlflow.get_run(judged.run_id)
    metrics = run.data.metrics
    assert run.info.status == "FINISHED" and run.data.tags["step"] == "judge"
    assert metrics["judge_labelled_traces"] == 6 and metrics["judge_unparseable"] == 0
    assert metrics["judge_accuracy"] == pytest.approx(4 / 6) and metrics["judge_cohen_kappa"] == 0.0
    assert metrics["judge_accuracy_ci_low"] <= 4 / 6 <= metrics["judge_accuracy_ci_high"]
    assert metrics["labels_disagreeing_traces"] == 1  # three reviewers of one trace, 2 yes to 1 no
    worst = load_table(run.info.run_id, "judge/disagreements.json")
    assert worst[0]["human"] is False and worst[0]["judge_score"] == 0.7 and "#/experiments/" in worst[0]["link"]
    assert load_table(run.info.run_id, "judge/confusion.json") == [
        {"human": "yes", "judge_yes": 4, "judge_no": 0}, {"human": "no", "judge_yes": 2, "judge_no": 0}]
    human = [a for a in mlflow.get_trace(traces[0]).info.assessments
             if a.source.source_type == AssessmentSourceType.HUMAN and a.name == "correct"]
    assert sorted(a.source.source_id for a in human) == ["ann", "bob", "cy"]
    # A second run finds the labels on the traces, with no file.
    again = run_judge(compose("judge", [*fake_overrides(fake, score=0.7),
                                        f"tracking.artifact_location={store}/artifacts"]))
    assert mlflow.get_run(again.run_id).data.metrics["judge_accuracy"] == pytest.approx(4 / 6)


@pytest.mark.parametrize("content, message", [("trace_id,label\ntr-nowhere,yes\n", "not in the tracking store"),
                                              ("trace_id,label\ntr-x,2\n", "out of range")])
def test_bad_labels_stop_before_any_run(store, fake, tmp_path, content, message):
    labels_file = tmp_path / "labels.csv"
    labels_file.write_text(content)
    with pytest.raises(ConfigError, match=message):
        run_judge(compose("judge", [*fake_overrides(fake), f"labels={labels_file}"]))
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list")
