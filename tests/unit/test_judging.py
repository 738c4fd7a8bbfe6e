"""Labels read from files and the judge's agreement with them: pure functions, known answers."""

import dspy
import pytest

from pipelines.config import ConfigError
from pipelines.judging import agreement, labels


def test_labels_come_from_csv_or_jsonl_and_reviewers_stay_apart(tmp_path):
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("trace_id,label,rationale,reviewer\ntr-1,yes,right,ann\ntr-1,no,,bob\ntr-1,pass,,cy\n"
                        "tr-2,fail,,ann\ntr-3,yes,,ann\ntr-3,no,,bob\n")
    read = labels.read(csv_file)
    assert [(x.trace_id, x.value, x.reviewer) for x in read][:2] == [("tr-1", True, "ann"), ("tr-1", False, "bob")]
    assert read[0].rationale == "right" and read[1].rationale is None
    consensus = labels.by_trace(read)
    assert consensus["tr-1"] == labels.Consensus(True, 3, True)      # majority yes, a disagreement
    assert consensus["tr-2"] == labels.Consensus(False, 1, False)
    assert consensus["tr-3"].value is None and consensus["tr-3"].disagree  # an even split: no majority
    jsonl = tmp_path / "labels.jsonl"
    jsonl.write_text('{"trace_id": "tr-1", "label": 0.8}\n{"trace_id": "tr-1", "label": 0.2, "reviewer": "b"}\n')
    numeric = labels.by_trace(labels.read(jsonl))
    assert numeric["tr-1"].value == pytest.approx(0.5) and numeric["tr-1"].disagree


@pytest.mark.parametrize("content, message", [
    ("trace_id,label\ntr-1,maybe\n", r"labels.csv:2: label 'maybe' is out of range"),
    ("trace_id,label\ntr-1,1.5\n", "out of range"),
    ("trace_id,label\n,yes\n", "labels.csv:2: no trace_id"),
    ("trace_id,label\n", "no labels in it"),
])
def test_bad_label_files_fail_in_one_line(tmp_path, content, message):
    path = tmp_path / "labels.csv"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        labels.read(path)


def test_agreement_statistics_have_known_values():
    human = [True, True, False, False, True, False, True, False]
    judge = [True, False, False, False, True, True, True, False]  # 6 of 8 agree
    assert agreement.accuracy(human, judge) == 0.75
    assert agreement.cohen_kappa(human, judge) == pytest.approx(0.5)  # chance agreement 0.5
    assert agreement.cohen_kappa([True] * 4, [True] * 4) == 0.0
    assert agreement.pearson([0.1, 0.5, 0.9], [0.2, 0.4, 0.8]) == pytest.approx(0.9820, abs=1e-4)
    assert agreement.spearman([0.1, 0.5, 0.9], [0.3, 0.2, 0.8]) == pytest.approx(0.5)
    assert agreement.confusion(human, judge) == [{"human": "yes", "judge_yes": 3, "judge_no": 1},
                                                 {"human": "no", "judge_yes": 1, "judge_no": 3}]


def test_measure_cuts_a_numeric_judge_for_yes_no_labels_and_gives_intervals():
    human = [True, False] * 10
    scores = [0.9, 0.1] * 9 + [0.2, 0.8]  # the judge agrees on 18 of 20 at the 0.5 cut
    measured = {a.name: a for a in agreement.measure(human, scores, threshold=0.5, seed=1)}
    assert measured["accuracy"].value == 0.9 and measured["accuracy"].n == 20
    assert measured["accuracy"].low < 0.9 < measured["accuracy"].high <= 1.0
    assert measured["cohen_kappa"].value == pytest.approx(0.8)
    numeric = {a.name for a in agreement.measure([0.1, 0.4, 0.8], [0.2, 0.5, 0.7])}
    assert numeric == {"pearson_r", "spearman_r"}


def test_labels_stored_on_traces_read_back_as_label_values():
    assert [labels.coerce(v) for v in (True, "pass", "Fail", "0.25", 1, "maybe", 3)] == [True, True, False, 0.25,
                                                                                        True, None, None]


def test_a_reviewers_last_label_on_a_trace_counts_once():
    given = [labels.Label("tr-1", True, "ann"), labels.Label("tr-1", False, "ann"), labels.Label("tr-1", False, "bob")]
    assert labels.by_trace(given)["tr-1"] == labels.Consensus(False, 2, False)


def test_an_aligned_judge_becomes_one_mlflow_judge_template_with_its_demos():
    from pipelines.judging.align import JudgeProgram
    from pipelines.tracking.judging.registry import judge_instructions, judge_model

    program = JudgeProgram()
    (predictor,) = [p for _, p in program.named_predictors()]
    predictor.demos = [dspy.Example(question="how do I {{ x }}?", ground_truth="use y", system_response="use y",
                                    precision=1.0, recall=1.0, augmented=True)]
    text = judge_instructions(program, 0.6)
    assert text.startswith(predictor.signature.instructions[:40]) and "0.6 or more" in text
    assert "Worked verdict 1" in text and "how do I { { x }}?" in text and "augmented" not in text
    assert text.count("{{") == 3 and text.endswith("Response to judge: {{ outputs }}")
    assert judge_model("openai/gpt-4o-mini") == "openai:/gpt-4o-mini" and judge_model("smollm2") == "openai:/smollm2"


@pytest.mark.parametrize("ref", ["runs:/abc/judge/aligned.json", "/tmp/aligned.json", "aligned.json",
                                 "judges/aligned.json"])
def test_a_judge_given_by_path_or_artifact_uri_is_used_as_it_is(ref):
    from pipelines.tracking.judging.registry import ResolvedJudge, resolve_judge

    assert resolve_judge(ref) == ResolvedJudge(state=ref, version=ref)
