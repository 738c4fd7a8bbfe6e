"""Labels read from files and the judge's agreement with them: pure functions, known answers."""

import dspy
import pytest
from dspy.utils import DummyLM

from pipelines.errors import ConfigError
from pipelines.judging import agreement, align, labels

from helpers import ANSWERS, _judged_answer, _pass_fail_answer


def test_labels_come_from_csv_or_jsonl_and_reviewers_stay_apart(tmp_path):
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("trace_id,label,rationale,reviewer\ntr-1,yes,right,ann\ntr-1,no,,bob\ntr-1,pass,,cy\n"
                        "tr-2,fail,,ann\ntr-3,yes,,ann\ntr-3,no,,bob\n")
    read = labels.read(csv_file)
    assert [(x.trace_id, x.value, x.reviewer) for x in read][:2] == [("tr-1", True, "ann"), ("tr-1", False, "bob")]
    assert read[0].rationale == "right" and read[1].rationale is None
    consensus = labels.by_trace(read)
    assert consensus["tr-1"] == labels.Consensus(True, 3, True, "right")  # majority yes (its comment), disagreed
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


def test_an_aligned_judges_state_is_loaded_from_a_local_copy_and_a_uri_with_nothing_there_is_one_line(store, tmp_path):
    import mlflow

    from pipelines.evaluation.judge import JudgedF1
    from pipelines.judging.align import JudgeProgram
    from pipelines.tracking.judging.registry import aligned_state

    aligned = JudgeProgram()
    (predictor,) = [p for _, p in aligned.judge.named_predictors()]
    predictor.demos = [dspy.Example(question="q?", ground_truth="a", system_response="a", precision=1.0, recall=1.0)]
    path = tmp_path / "aligned.json"
    aligned.judge.save(str(path))
    assert aligned_state(str(path)) == str(path)  # a local file is used as it is
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(path), "judge")
    uri = f"runs:/{run.info.run_id}/judge/aligned.json"
    local = aligned_state(uri)
    assert local != uri and open(local).read() == path.read_text()
    judged = JudgedF1(DummyLM([]), aligned=local, version=uri)
    (loaded,) = [p for _, p in judged.metric.named_predictors()]
    assert [d["question"] for d in loaded.demos] == ["q?"] and judged.name == f"dummy aligned:{uri}"
    nothing = "runs:/nothing/judge/aligned.json"
    with pytest.raises(ConfigError, match=rf"^scoring.judge={nothing}: no aligned judge there \(") as raised:
        aligned_state(nothing)
    assert "\n" not in str(raised.value)


def test_reviewers_agreement_with_each_other_is_cohens_kappa_on_the_traces_they_share():
    ann = [True, True, False, False, True, False, True, False]
    bob = [True, False, False, False, True, True, True, False]  # 6 of 8 as ann: kappa 0.5
    given = ([labels.Label(f"tr-{i}", v, "ann") for i, v in enumerate(ann)] + [labels.Label("tr-9", True, "ann")]
             + [labels.Label(f"tr-{i}", v, "bob") for i, v in enumerate(bob)])  # tr-9: ann's alone, not shared
    two = agreement.between_reviewers(given, seed=1)
    assert two.name == "cohen_kappa" and two.value == pytest.approx(0.5) and two.n == 8
    assert two.low < 0.5 < two.high
    # A third reviewer who says what ann says: the mean of the pairs' kappas, (1 + 0.5 + 0.5) / 3.
    three = agreement.between_reviewers(given + [labels.Label(f"tr-{i}", v, "cy") for i, v in enumerate(ann)])
    assert three.value == pytest.approx(2 / 3) and three.n == 8
    # A reviewer's last word counts: bob changing his mind on tr-1 to agree with ann makes them agree throughout.
    assert agreement.between_reviewers(given + [labels.Label("tr-1", True, "bob"),
                                                labels.Label("tr-5", False, "bob")]).value == pytest.approx(1.0)
    assert agreement.between_reviewers(given[:8]) is None  # one reviewer
    assert agreement.between_reviewers([labels.Label("tr-1", True, "ann"), labels.Label("tr-1", False, "bob")]) is None
    assert agreement.between_reviewers([labels.Label("tr-1", 0.5, "ann"), labels.Label("tr-1", 0.7, "bob"),
                                        labels.Label("tr-2", 0.1, "ann"), labels.Label("tr-2", 0.2, "bob")]) is None


def test_a_judges_champion_moves_by_the_programs_rule_interval_above_zero_and_permutation_p_below():
    from pipelines.evaluation.promotion import shortfall
    from pipelines.evaluation.stats import paired_difference

    def gained(up: int, same: int, down: int = 0):
        """Held-out agreement (0 or 100 per example), aligned - original: `up` examples gained, `down` lost."""
        return paired_difference([100.0] * (up + same) + [0.0] * down, [0.0] * up + [100.0] * (same + down))

    # The README's old claim: 4 of 9 held-out examples gained, none lost. Its interval lies above 0, but no
    # sign-flip test of 4 non-zero differences gives p below 2/16: not champion.
    four = gained(4, 5)
    assert four.above_zero and (four.delta.low, four.delta.high) == pytest.approx((11.1, 77.8), abs=0.05)
    assert four.p_value == 0.125
    assert "permutation test gives p=0.125, not below 0.05" in shortfall(four, 0.95)
    assert shortfall(gained(6, 6), 0.95) is None  # 6 of 12: p = 2/64, both tests agree
    assert "is not above 0" in shortfall(gained(3, 6, down=2), 0.95)
    assert "too few paired examples" in shortfall(gained(1, 0), 0.95)
    assert shortfall(four, 0.80) is None  # at 80% confidence p=0.125 is below 0.2


class FakeJudgeLM(DummyLM):
    """The integration tests' fake SemanticF1 judge (helpers `_judged_answer`) in process: it reads the whole
    request, demos included, and passes every short answer until a demo shows it one failed."""

    def __init__(self):
        super().__init__([], follow_examples=True)

    def _use_example(self, messages):
        score = _judged_answer({"messages": messages})
        return self._format_answer_fields({"reasoning": "r", "ground_truth_key_ideas": "g",
                                           "system_response_key_ideas": "s", "discussion": "d",
                                           "recall": score, "precision": score})


def labelled_answers(n: int) -> list[dspy.Example]:
    """n questions answered as ANSWERS[i % 4], labelled as a person would (yes only for `the right way`);
    the short answers' fails carry a reviewer's comment."""
    return [align.example(f"how do I do task {i}?", "run the command with the flag", ANSWERS[i % 4],
                          label="right" in ANSWERS[i % 4], trace_id=f"tr-{i}",
                          rationale="no usable answer" if i % 4 < 2 else None) for i in range(n)]


def agreement_of(program, examples, lm) -> float:
    return sum((s >= 0.5) == e.label for s, e in zip(align.verdicts(program, examples, lm), examples,
                                                     strict=True)) / len(examples)


def test_the_alignment_share_is_shuffled_by_the_seed_and_alternates_labels():
    data = labelled_answers(20)  # 5 yes, 15 no
    parts = align.split(data, 0.4, seed=0)
    assert [e.label for e in parts.align] == [True, False, True, False, True, False] + [False] * 6
    assert sum(e.label for e in parts.held_out) == 2 and len(parts.held_out) == 8  # stratified: 2 of 5, 6 of 15
    assert align.split(data, 0.4, seed=0) == parts
    assert [e.trace_id for e in align.split(data, 0.4, seed=1).align] != [e.trace_id for e in parts.align]


def test_demos_of_both_labels_saying_what_people_said_teach_the_judge_and_yes_only_demos_do_not():
    parts = align.split(labelled_answers(24), 0.4, seed=0)
    lm, original = FakeJudgeLM(), align.JudgeProgram()
    with dspy.context(lm=lm, adapter=None):
        aligned = align.Verdicts(align.Agrees(0.5), per_label=2).compile(original.deepcopy(), trainset=parts.align)
        # The old alignment: the share as every yes, then every no; BootstrapFewShot keeps its first 4 verdicts
        # that agreed with people, all of them passes of `the right way`.
        old_order = [e for e in parts.align if e.label] + [e for e in parts.align if not e.label]
        yes_only = dspy.BootstrapFewShot(metric=align.Agrees(0.5), max_bootstrapped_demos=4,
                                         max_labeled_demos=0).compile(original.deepcopy(), trainset=old_order)
    (demos,) = [p.demos for p in aligned.predictors()]
    assert [d.precision >= 0.5 for d in demos] == [True, False, True, False]  # yes and no, in turn
    short_fail = next(d for d in demos if len(d.system_response.split()) < 10)
    # The judge passed it; the demo is its verdict turned to the person's, with the person's comment.
    assert (short_fail.precision, short_fail.recall) == (0.0, 0.0)
    assert short_fail.discussion == short_fail.reasoning == "no usable answer"
    assert all(d.discussion == "d" for d in demos if d.precision >= 0.5)  # agreed, no comment: its own verdict
    (bootstrapped,) = [p.demos for p in yes_only.predictors()]
    assert len(bootstrapped) == 4 and all("right" in d.system_response for d in bootstrapped)
    before = agreement_of(original, parts.held_out, lm)
    assert before < 1.0  # the judge passes the short answers people fail
    assert agreement_of(aligned, parts.held_out, lm) == 1.0
    assert agreement_of(yes_only, parts.held_out, lm) == before


def test_the_fake_judge_learns_only_from_a_demo_that_fails_a_short_answer():
    """The fake must be able to stay wrong: demos of passes, or of long answers failed, teach it nothing."""
    def request(*demos: tuple[str, float]) -> dict:
        turns = [m for answer, f1 in demos
                 for m in ({"role": "user", "content": f"[[ ## system_response ## ]]\n{answer}\n\n"},
                           {"role": "assistant", "content": f'{{"recall": {f1}, "precision": {f1}}}'})]
        return {"messages": [{"role": "system", "content": "judge"}, *turns,
                             {"role": "user", "content": "[[ ## system_response ## ]]\nnope, no idea\n\nRespond with"}]}

    long_wrong = ANSWERS[3]
    assert _judged_answer(request()) == 0.9
    assert _judged_answer(request(("maybe, not sure", 0.9), (long_wrong, 0.1), (ANSWERS[2], 0.9))) == 0.9
    assert _judged_answer(request(("maybe, not sure", 0.2))) == 0.1

    def judgements(*examples: tuple[str, str]) -> dict:  # MLflow's judge, MemAlign's retrieved examples printed
        shown = "".join(f"\n  Example {i}: {dict(result=r, rationale='', outputs={'response': a})}"
                        for i, (a, r) in enumerate(examples, 1))
        return {"messages": [{"role": "system", "content": f"Example Judgements ({len(examples)}):{shown}\n"},
                             {"role": "user", "content": 'Answer to judge: outputs: {"response": "nope, no idea"}'}]}

    assert _pass_fail_answer(judgements()) is True
    assert _pass_fail_answer(judgements(("maybe, not sure", "true"), (long_wrong, "false"))) is True
    assert _pass_fail_answer(judgements(("maybe, not sure", "false"))) is False
