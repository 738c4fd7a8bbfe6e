"""How far to trust the judge: labels imported from a file onto an evaluation's traces (as HUMAN feedback),
the judge's agreement with them, and bad label files stopped before any run."""

import json
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import AssessmentSourceType
from mlflow.genai.scorers import list_scorers

from pipelines.config import compose
from pipelines.errors import ConfigError
from pipelines.steps.judge import run_judge
from pipelines.steps.variant import run_variant
from pipelines.tracking.evaluation import load_table

from helpers import ANSWERS, fake_overrides, learnable_judge, smoke


def test_imported_labels_reach_the_traces_and_the_judges_agreement_is_measured(store, fake, tmp_path):
    evaluated = run_variant(smoke("cot", store, *fake_overrides(fake, score=0.7), "data.dev_size=6"))
    traces = [r["trace_id"] for r in load_table(evaluated.run_id, "eval/dev_results.json")]
    assert len(traces) == 6 and all(traces)
    # The fake judge passes every answer (SemanticF1 0.7 >= 0.5): it agrees with the 4 yes labels only. Bob
    # labels 5 of ann's traces too, saying no where she said yes once (and cy one of them).
    bob = ["no,looks off", "yes,", "yes,", "yes,", "no,"]
    rows = ([f"{t},{'yes' if i < 4 else 'no'},,ann" for i, t in enumerate(traces)]
            + [f"{t},{said},bob" for t, said in zip(traces, bob, strict=False)] + [f"{traces[0]},yes,,cy"])
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
    # People's agreement with each other, the judge's ceiling: ann and bob on the 5 traces both labelled
    # (4 of 5 alike; chance 0.8 x 0.6 + 0.2 x 0.4), cy sharing only one trace with them.
    assert metrics["reviewers_cohen_kappa"] == pytest.approx((0.8 - 0.56) / 0.44)
    assert metrics["reviewers_shared_traces"] == 5 and metrics["reviewers_cohen_kappa_ci_low"] < 0.5
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


def label_file(path, rows: list[dict]):
    """Label traces as a person would: pass only the answers that give `the right way`, a comment on the fails
    of short answers."""
    path.write_text("trace_id,label,rationale\n" + "".join(
        f"{r['trace_id']},{'yes' if 'right' in r['prediction'] else 'no'},"
        f"{'no usable answer' if len(r['prediction'].split()) < 10 else ''}\n" for r in rows))
    return path


def test_alignment_raises_held_out_agreement_and_the_aligned_judge_scores_later_runs(store, fake, tmp_path):
    from pipelines.data import load_splits
    from pipelines.steps.evaluate import run_evaluate

    cfg = smoke("cot", store, *fake_overrides(fake))
    splits = load_splits(compose("cot", ["data.test_size=30"]).data)
    learnable_judge(fake, [e.question for e in splits.dev + splits.test])
    first = run_variant(smoke("cot", store, *fake_overrides(fake), "data.dev_size=10"))

    def tested(size: int) -> list[dict]:
        run = run_evaluate(compose("evaluate", [*fake_overrides(fake), f"model_uri={first.model_uri}", "split=test",
                                                f"data.test_size={size}",
                                                f"tracking.artifact_location={store}/artifacts"]))
        return load_table(run.run_id, "eval/test_results.json")

    rows = load_table(first.run_id, "eval/dev_results.json") + tested(12)
    judge_cfg = compose("judge", [*fake_overrides(fake), f"labels={label_file(tmp_path / 'labels.csv', rows)}",
                                  "align=true", f"tracking.artifact_location={store}/artifacts"])
    name = judge_cfg.judge_name
    judged = run_judge(judge_cfg)
    print("22 labels, held-out agreement, aligned - original:", judged.alignment.describe())
    run = mlflow.get_run(judged.run_id)
    assert run.data.tags["aligned_judge"] == judged.aligned and run.data.metrics["align_demos"] == 4
    # Its interval lies above 0, but 9 held-out examples cannot carry a permutation p below 0.05: registered
    # (a version of the experiment's scorer, on the Judges page, and of the prompt), not champion.
    assert judged.alignment.above_zero and judged.alignment.p_value >= 0.05 and not judged.registered.champion
    (scorer,) = list_scorers(experiment_id=run.info.experiment_id)
    assert scorer.name == name and scorer.scorer_version == judged.registered.version == 1
    assert "Worked verdict 1" in scorer.instructions and "{{ outputs }}" in scorer.instructions
    assert "no usable answer" in scorer.instructions  # a reviewer's comment, in a demo
    with pytest.raises(ConfigError, match="has raised held-out agreement beyond doubt yet"):
        run_variant(smoke("cot", store, *fake_overrides(fake), f"scoring.judge={name}"))
    # 30 more labelled traces: the held-out gain now passes both tests, and this alignment is champion.
    more = run_judge(compose("judge", [*fake_overrides(fake), "align=true",
                                       f"labels={label_file(tmp_path / 'more.csv', tested(30))}",
                                       f"tracking.artifact_location={store}/artifacts"]))
    print("52 labels, held-out agreement, aligned - original:", more.alignment.describe())
    assert more.alignment.above_zero and more.alignment.p_value < 0.05 and more.registered.champion
    prompt = mlflow.genai.load_prompt(f"prompts:/{name}@champion")
    assert prompt.tags["dspy_state"] == more.aligned
    assert mlflow.get_run(more.run_id).data.tags["registered_judge"] == f"{name} v2"
    # Scoring with the aligned judge by its name: the run says which judge version scored it, and promotion
    # will not compare it with the champion the original judge scored.
    again = run_variant(smoke("cot", store, *fake_overrides(fake), "data.dev_size=10", f"scoring.judge={name}"))
    assert again.result.judge.endswith(f"aligned:{name} v2")
    assert mlflow.get_run(again.run_id).data.tags["judge"] == again.result.judge
    version = mlflow.MlflowClient().get_model_version(cfg.tracking.registered_model, again.version)
    assert "scored by another judge" in version.tags["promotion"]
    with pytest.raises(ConfigError, match="no registered judge"):
        run_variant(smoke("cot", store, *fake_overrides(fake), f"scoring.judge={name}@nowhere"))


def old_split(examples, held_out, seed):
    """The alignment share as it was split before: every yes-labelled example, then every no-labelled one."""
    import random

    from pipelines.judging.align import Split

    rng, align, keep = random.Random(seed), [], []
    for value in (True, False):
        group = [e for e in examples if e.label is value]
        rng.shuffle(group)
        cut = round(len(group) * held_out)
        keep += group[:cut]
        align += group[cut:]
    return Split(align, keep)


def test_only_demos_that_show_people_failing_what_the_judge_passes_raise_its_agreement(store, fake, tmp_path,
                                                                                       monkeypatch):
    """On the same 30 labels and held-out share: the default alignment (demos of both labels, people's
    verdicts) against the old one (yes-labelled first, BootstrapFewShot) and BootstrapFewShot alternating."""
    from pipelines.data import load_splits
    from pipelines.judging import align

    dev = load_splits(compose("cot", ["experiment=smoke", "data.dev_size=30"]).data).dev
    learnable_judge(fake, [e.question for e in dev])
    evaluated = run_variant(smoke("cot", store, *fake_overrides(fake), "data.dev_size=30"))
    labels_file = label_file(tmp_path / "labels.csv", load_table(evaluated.run_id, "eval/dev_results.json"))
    # The old alignment, built on purpose: yes-labelled examples first (4 of the 7 to align on), and
    # BootstrapFewShot stopping at its first 4 verdicts that agreed with people: 4 passes of `the right way`.
    bootstrap = compose("judge", [*fake_overrides(fake), f"labels={labels_file}", "align=true", "optimizer=bootstrap",
                                  "optimizer.max_bootstrapped_demos=4", "optimizer.max_labeled_demos=0",
                                  f"tracking.artifact_location={store}/artifacts"])
    with monkeypatch.context() as patched:
        patched.setattr(align, "split", old_split)
        judged = run_judge(bootstrap)
    print("yes-only demos: held-out agreement, aligned - original:", judged.alignment.describe())
    assert [d["system_response"] for d in demos_of(judged)] == [ANSWERS[2]] * 4
    assert judged.alignment.delta.value == 0 and not judged.alignment.above_zero and not judged.registered.champion
    # Balance alone does not teach either: on the alternating share BootstrapFewShot's demos are yes and no,
    # but the only fails among them are long answers, the judge's own verdicts that already agreed.
    balanced = run_judge(bootstrap)
    print("BootstrapFewShot, alternating labels: held-out agreement, aligned - original:",
          balanced.alignment.describe())
    assert {d["system_response"] for d in demos_of(balanced)} == {ANSWERS[2], ANSWERS[3]}
    assert balanced.alignment.delta.value == 0 and not balanced.registered.champion
    # The default: people's verdicts on 2 yes and 2 no, a short answer's fail among them, with its comment.
    taught = run_judge(compose("judge", [*fake_overrides(fake), f"labels={labels_file}", "align=true",
                                         f"tracking.artifact_location={store}/artifacts"]))
    print("Verdicts (the default): held-out agreement, aligned - original:", taught.alignment.describe())
    assert [d["precision"] >= 0.5 for d in demos_of(taught)] == [True, False, True, False]
    assert any(d["discussion"] == "no usable answer" and d["precision"] == 0.0 for d in demos_of(taught))
    assert taught.alignment.above_zero and taught.alignment.p_value < 0.05 and taught.registered.champion


def demos_of(judged) -> list[dict]:
    """The demos of a judge run's aligned judge, from its `judge/aligned.json`."""
    return json.loads(Path(mlflow.artifacts.download_artifacts(judged.aligned)).read_text())["module.predict"]["demos"]


def test_labels_of_one_kind_cannot_align_and_stop_before_any_run(store, fake, tmp_path):
    evaluated = run_variant(smoke("cot", store, *fake_overrides(fake, score=0.7), "data.dev_size=6"))
    labels_file = tmp_path / "labels.csv"
    labels_file.write_text("trace_id,label\n" + "".join(f"{r['trace_id']},yes\n" for r in
                                                        load_table(evaluated.run_id, "eval/dev_results.json")))
    calls = fake.calls
    with pytest.raises(ConfigError, match="align=true needs yes and no labels to build demos of both: 6 yes and 0 no"):
        run_judge(compose("judge", [*fake_overrides(fake), f"labels={labels_file}", "align=true"]))
    assert fake.calls == calls  # no LM call, and no judge run
    assert not mlflow.search_runs(search_all_experiments=True, filter_string="tags.step = 'judge'",
                                  output_format="list")


def test_a_runs_dev_traces_go_to_a_review_queue_with_the_label_schema(store, fake):
    from mlflow.genai import label_schemas, review_queues

    from pipelines.steps.judge import run_review

    evaluated = run_variant(smoke("cot", store, *fake_overrides(fake), "data.dev_size=4"))
    queued = run_review(compose("review", [f"run_id={evaluated.run_id}"]))
    experiment = mlflow.get_run(evaluated.run_id).info.experiment_id
    (schema,) = [s for s in label_schemas.list_label_schemas(experiment_id=experiment) if s.name == "correct"]
    (queue,) = [q for q in review_queues.list_review_queues(experiment_id=experiment) if q.name == queued.queue]
    items = review_queues.list_review_queue_items(queue.queue_id)
    traces = {r["trace_id"] for r in load_table(evaluated.run_id, "eval/dev_results.json")}
    assert queued.items == 4 and {i.item_id for i in items} == traces and schema.schema_id in queue.schema_ids
    gold = {r["trace_id"]: r["gold"] for r in load_table(evaluated.run_id, "eval/dev_results.json")}
    assert all([a.value for a in mlflow.get_trace(t).info.assessments if a.name == "expected_response"] == [g]
               for t, g in gold.items())  # the reference answer, beside the program's, for reviewers
    # Queueing the same run again changes nothing; a second run reuses the experiment's schema.
    assert run_review(compose("review", [f"run_id={evaluated.run_id}"])).items == 0
    assert len(review_queues.list_review_queue_items(queue.queue_id)) == 4
    again = run_variant(smoke("rag", store, *fake_overrides(fake), "data.dev_size=2"))
    run_review(compose("review", [f"run_id={again.run_id}"]))
    assert [s.name for s in label_schemas.list_label_schemas(experiment_id=experiment)].count("correct") == 1
    with pytest.raises(ConfigError, match="review needs run_id"):
        run_review(compose("review"))


@pytest.mark.parametrize("aligner", ["memalign", "simba"])
def test_mlflows_own_alignment_is_measured_beside_the_dspy_one_on_the_same_held_out_share(store, fake, tmp_path,
                                                                                          aligner):
    from mlflow.genai.scorers import get_scorer

    from pipelines.data import load_splits

    dev = load_splits(compose("cot", ["experiment=smoke", "data.dev_size=20"]).data).dev
    learnable_judge(fake, [e.question for e in dev])
    evaluated = run_variant(smoke("cot", store, *fake_overrides(fake), "data.dev_size=20"))
    rows = load_table(evaluated.run_id, "eval/dev_results.json")
    labels_file = label_file(tmp_path / "labels.csv", rows)
    judge_cfg = compose("judge", [*fake_overrides(fake), f"labels={labels_file}", "align=true", "align_held_out=0.5",
                                  f"mlflow_aligner={aligner}", f"tracking.artifact_location={store}/artifacts"])
    judged = run_judge(judge_cfg)
    run = mlflow.get_run(judged.run_id)
    metrics = run.data.metrics
    print(f"DSPy: {judged.alignment.describe()}; " + "; ".join(
        f"{what} {metrics[f'{key}_delta']:+.1f} [{metrics[f'{key}_delta_ci_low']:.1f}, "
        f"{metrics[f'{key}_delta_ci_high']:.1f}], p={metrics.get(f'{key}_delta_p_value')}"
        for what, key in ((f"{aligner} - unaligned", "mlflow_align_heldout_agreement"),
                          (f"{aligner} - DSPy", "mlflow_vs_dspy_heldout_agreement"))))
    assert metrics["mlflow_align_unparseable"] == 0 and "mlflow_vs_dspy_heldout_agreement_delta_ci_low" in metrics
    # The gold answers went onto the traces as expectations, which MLflow's aligners read.
    trace = mlflow.get_trace(rows[0]["trace_id"])
    assert [a.value for a in trace.info.assessments if a.name == "expected_response"] == [rows[0]["gold"]]
    name = f"{judge_cfg.judge_name}-{aligner}"
    assert run.data.tags["mlflow_aligned_judge"] == f"{name} v1"
    get_scorer(name=name, experiment_id=run.info.experiment_id)  # registered: raises if not
    if aligner == "memalign":  # its example judgements teach the fake judge what people pass
        assert metrics["mlflow_align_heldout_agreement_delta_ci_low"] > 0
