"""Run lifecycle, config logging and champion promotion against a temporary store."""

import time

import dspy
import mlflow
import pytest
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import BAD_REQUEST
from omegaconf import OmegaConf

from pipelines import tracking
from pipelines.config import compose
from pipelines.evaluation.result import EvalResult
from pipelines.evaluation.scoring import Scoring
from pipelines.tracking.evaluation import dataset_source


def cfg_for(store):
    return OmegaConf.create({"lm": {"model": "m", "api_key": "sk-secret", "api_key_env": "X"},
                             "tracking": {"uri": mlflow.get_tracking_uri(), "experiment": "t"}})


def test_run_finishes_and_logs_config_without_secrets(store):
    with tracking.run("step", cfg_for(store)) as active:
        pass
    run = mlflow.get_run(active.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["lm.model"] == "m" and "lm.api_key" not in run.data.params
    text = mlflow.artifacts.load_text(f"runs:/{active.info.run_id}/config.yaml")
    assert "sk-secret" not in text and "api_key_env: X" in text


@pytest.mark.parametrize("error, status", [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_run_ends_failed_or_killed(store, error, status):
    with pytest.raises(type(error)):
        with tracking.run("step", cfg_for(store)) as active:
            raise error
    run = mlflow.get_run(active.info.run_id)
    assert run.info.status == status and mlflow.active_run() is None
    if status == "FAILED":
        assert run.data.tags["error"] == "RuntimeError: boom"


def test_nested_runs_become_children(store):
    with tracking.run("parent", cfg_for(store)) as parent:
        with tracking.run("child", cfg_for(store)) as child:
            pass
    assert mlflow.get_run(child.info.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id


def scoring(rule="significant"):
    return Scoring.from_cfg(compose("cot", ["scoring.primary=semantic_f1", f"scoring.promotion={rule}"]).scoring)


def dev_result(scores, rule="significant"):
    """A dev evaluation with these per-example SemanticF1 scores (0-100; None: the judge gave no verdict), one
    question each."""
    rows = [{"question": f"q{i}", "semantic_f1": None if s is None else float(s), "error": ""}
            for i, s in enumerate(scores)]
    return EvalResult.from_rows(rows, scoring(rule))


def register_scores(scores, rule="significant", model="reg", dev_set="dev1", log_table=True):
    """Log a run with the dev table and a model, as a step does, and register it."""
    result = dev_result(scores, rule)
    with mlflow.start_run():
        if log_table:
            tracking.log_evaluation(result, split="dev")
        info = mlflow.pyfunc.log_model(name="m", python_model=lambda inputs: inputs, input_example=["x"],
                                       pip_requirements=[])
        return tracking.register(info.model_uri, registered_model=model, model_id=info.model_id, result=result,
                                 dev_set=dev_set, variant="v", scoring=scoring(rule))


def version_of(model, registration):
    """The registered version and the metrics of its LoggedModel."""
    version = mlflow.MlflowClient().get_model_version(model, registration.version)
    return version, {m.key: m.value for m in mlflow.get_logged_model(version.source[len("models:/"):]).metrics}


def champion(model="reg"):
    return mlflow.MlflowClient().get_model_version_by_alias(model, tracking.CHAMPION)


# 20 examples judged mostly 0 or 100, as a small judge does; NOISE flips two up and one down: +5 on average.
CHAMPION_SCORES = [0, 100] * 10
NOISE = [100, 100, 100, 100, 0, 0] + [0, 100] * 7
CLEAR = [min(100, s + 60) for s in CHAMPION_SCORES]


def test_noise_only_difference_moves_the_champion_under_better_but_not_under_significant(store):
    assert sum(NOISE) - sum(CHAMPION_SCORES) == 100  # +5 points over 20 examples
    for rule, promoted in (("better", True), ("significant", False)):
        model = f"reg-{rule}"
        assert register_scores(CHAMPION_SCORES, rule, model).promoted  # first version
        second = register_scores(NOISE, rule, model)
        assert second.promoted is promoted
        version, metrics = version_of(model, second)
        assert version.tags["promotion"] == second.promotion.reason and "champion v1" in second.promotion.reason
        assert metrics["vs_champion_dev_semantic_f1_delta"] == 5.0
        low, high = metrics["vs_champion_dev_semantic_f1_delta_ci_low"], metrics[
            "vs_champion_dev_semantic_f1_delta_ci_high"]
        assert low < 0 < high and 0 < metrics["vs_champion_dev_semantic_f1_delta_p_value"] <= 1
        assert str(champion(model).version) == str(second.version if promoted else 1)


def test_clear_per_example_improvement_is_promoted_under_significant(store):
    register_scores(CHAMPION_SCORES)
    assert not register_scores(NOISE).promoted
    third = register_scores(CLEAR)
    assert third.promoted and "beats champion v1 beyond noise" in third.promotion.reason
    current, metrics = version_of("reg", third)
    assert str(current.version) == third.version == str(champion().version)
    assert metrics["vs_champion_dev_semantic_f1_delta_ci_low"] > 0
    assert metrics["dev_semantic_f1"] == 80.0 and "dev_semantic_f1_ci_low" in metrics


def test_unscored_examples_stay_missing_through_the_store_and_out_of_the_pairs(store):
    # The champion's table is read back from its run: the examples its judge could not score stay missing.
    register_scores([None, None, *CHAMPION_SCORES[2:]])
    second = register_scores([*CLEAR[:19], None])
    version, metrics = version_of("reg", second)
    assert second.promoted and second.promotion.comparison.delta.n == 17  # 20 less 2 on one side, 1 on the other
    # Questions 2-18: the 9 the champion scored 0 are +60, the 8 it scored 100 are +0.
    assert metrics["vs_champion_dev_semantic_f1_delta"] == pytest.approx(9 * 60 / 17, abs=1e-3)
    assert metrics["dev_semantic_f1_n"] == 19
    assert version.tags["dev_semantic_f1"].endswith("(95% CI, n=19), 1 of 20 examples unscored (no judge verdict)")
    unscored = register_scores([None] * 20)
    version, metrics = version_of("reg", unscored)
    assert not unscored.promoted and "no example scored" in unscored.promotion.reason
    assert not [k for k in metrics if k.startswith("dev_semantic_f1")] and str(champion().version) == second.version
    assert version.tags["dev_semantic_f1"].startswith("no example scored")


def test_versions_carry_the_few_tags_a_person_reads(store):
    register_scores(CHAMPION_SCORES)
    second = register_scores(CLEAR)
    version, _ = version_of("reg", second)
    assert set(version.tags) == {"variant", "dev_semantic_f1", "promotion"}
    assert version.tags["dev_semantic_f1"].startswith("80.0 ± ") and "(95% CI, n=20)" in version.tags["dev_semantic_f1"]
    assert mlflow.get_logged_model(version.source[len("models:/"):]).tags["dev_set"] == "dev1"


def test_a_champion_registered_from_another_experiment_is_paired_with(store):
    mlflow.set_experiment("elsewhere")
    register_scores(CHAMPION_SCORES)
    mlflow.set_experiment("here")
    third = register_scores(CLEAR)
    assert third.promoted and "beats champion v1 beyond noise" in third.promotion.reason


def test_champion_stays_when_scores_cannot_be_paired(store):
    register_scores(CHAMPION_SCORES, log_table=False)  # e.g. registered by an older version of the project
    second = register_scores(CLEAR)
    assert not second.promoted and "cannot pair" in second.promotion.reason
    other_dev = register_scores(CLEAR, dev_set="dev2")
    assert not other_dev.promoted and "another dev set" in other_dev.promotion.reason
    assert str(champion().version) == "1"


def test_better_keeps_the_strict_point_comparison(store):
    assert register_scores([40, 40], "better").promoted
    assert not register_scores([30, 30], "better").promoted
    assert not register_scores([40, 40], "better").promoted  # a tie does not move it
    third = register_scores([55, 55], "better")
    assert third.promoted and str(champion().version) == third.version


def test_one_example_logs_the_score_without_an_interval(store):
    with mlflow.start_run() as run:
        tracking.log_evaluation(dev_result([70]), split="dev")
    logged = mlflow.get_run(run.info.run_id).data
    assert logged.metrics["semantic_f1"] == 70.0 and "semantic_f1_ci_low" not in logged.metrics
    assert "1 example" in logged.tags["confidence_intervals"]


def test_datasets_are_logged_from_an_unambiguous_source(store, recwarn):
    from pipelines.config import compose
    from pipelines.data import load_splits

    cfg = compose("cot", ["experiment=smoke", f"tracking.artifact_location={store}/artifacts"])
    with mlflow.start_run() as active:
        datasets = tracking.log_datasets({"dev": load_splits(cfg.data).dev}, cfg.data)
    assert not [w for w in recwarn if "interpreted in multiple ways" in str(w.message)]
    (logged,) = mlflow.get_run(active.info.run_id).inputs.dataset_inputs
    assert logged.dataset.name == "sample-dev" and logged.dataset.source_type == "local"
    assert datasets["dev"].source.uri.endswith("ragqa_arena_tech_examples.jsonl")
    tutorial = compose("cot", ["data=ragqa_arena_tech"]).data
    assert dataset_source(tutorial).url == tutorial.examples_url


# What the team server (PostgreSQL) answered a job whose dataset another job inserted a moment before.
DUPLICATE_ON_SERVER = RestException({"error_code": "BAD_REQUEST", "message": (
    '(psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint "dataset_pk"')})
# The same race on a local SQLite store (MLflow wraps SQLAlchemy's IntegrityError in BAD_REQUEST).
DUPLICATE_IN_SQLITE = MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                                      "datasets.name, datasets.digest", error_code=BAD_REQUEST)
OTHER_BAD_REQUEST = RestException({"error_code": "BAD_REQUEST", "message": "Invalid value for dataset digest"})


@pytest.mark.parametrize("errors, calls", [
    ([DUPLICATE_ON_SERVER], 2),  # the row exists now: the second try links the run to it
    ([DUPLICATE_IN_SQLITE], 2),
    ([DUPLICATE_ON_SERVER, DUPLICATE_ON_SERVER], 2),  # one more try, no more
    ([OTHER_BAD_REQUEST], 1),  # anything else is not retried
    ([RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "duplicate key in dataset"})], 1),
])
def test_a_dataset_logged_by_another_run_at_the_same_moment_is_linked_with_one_more_try(store, monkeypatch,
                                                                                       errors, calls):
    from pipelines.data import load_splits

    log_input, tries = mlflow.log_input, []

    def racing(dataset, context):  # the store's answers, then the real store
        tries.append(context)
        if len(tries) <= len(errors):
            raise errors[len(tries) - 1]
        log_input(dataset, context=context)

    monkeypatch.setattr(mlflow, "log_input", racing)
    cfg = compose("cot", ["experiment=smoke", f"tracking.artifact_location={store}/artifacts"])
    with mlflow.start_run() as active:
        if calls > len(errors):
            tracking.log_datasets({"dev": load_splits(cfg.data).dev}, cfg.data)
        else:
            with pytest.raises(MlflowException) as raised:
                tracking.log_datasets({"dev": load_splits(cfg.data).dev}, cfg.data)
            assert raised.value is errors[calls - 1]
    assert len(tries) == calls
    logged = mlflow.get_run(active.info.run_id).inputs.dataset_inputs
    assert [d.dataset.name for d in logged] == (["sample-dev"] if calls > len(errors) else [])


def program_with(instructions: str, signature: str = "question -> response", demos=()):
    program = dspy.ChainOfThought(signature)
    program.predict.signature = program.predict.signature.with_instructions(instructions)
    program.predict.demos = list(demos)
    return program


def test_prompts_keep_instructions_and_demos_as_plain_text_and_follow_the_champion(store):
    demo = dspy.Example(question="undo a commit?", reasoning="r", response="git reset {{ HEAD }}", augmented=True)
    cot = program_with("Answer tersely.", demos=[demo])
    rag = dspy.Module()  # named like RAG's predictor: respond.predict
    rag.respond = program_with("Use the context. Jinja {% if %} stays text.", "context, question -> response")
    with mlflow.start_run():
        cot_prompts = tracking.register_prompts(cot, registered_model="reg", variant="cot")
        tracking.link_prompts(cot_prompts, registered_model="reg", version="1", promoted=True)
        (prompt,) = cot_prompts
        assert prompt.name == "reg.predict" and prompt.variables == set()
        assert prompt.template == [
            {"role": "system", "content": "Answer tersely."},
            {"role": "user", "content": "question: undo a commit?"},
            {"role": "assistant", "content": "reasoning: r\n\nresponse: git reset { { HEAD }}"}]
        assert prompt.tags["braces_escaped"] == "true" and prompt.tags["demos"] == "1"
        assert mlflow.genai.load_prompt("prompts:/reg.predict@champion").version == prompt.version
        rag_prompts = tracking.register_prompts(rag, registered_model="reg", variant="rag")
        tracking.link_prompts(rag_prompts, registered_model="reg", version="2", promoted=True)
    champion = mlflow.genai.load_prompt("prompts:/reg.predict@champion", allow_missing=True, cache_ttl_seconds=0)
    assert champion is None  # the new champion has no `predict` predictor
    assert mlflow.genai.load_prompt("prompts:/reg.predict/1").tags["model_version"] == "1"
    rag_champion = mlflow.genai.load_prompt("prompts:/reg.respond.predict@champion")
    assert rag_champion.template[0]["content"] == "Use the context. Jinja { % if %} stays text."


class Recorded:
    """An LM's call history, as DSPy records it (usage and cost per call)."""

    def __init__(self, *tokens):
        self.history = [self.call(t) for t in tokens]

    @staticmethod
    def call(tokens, cost=0.5):
        return {"usage": {"prompt_tokens": tokens, "completion_tokens": 1}, "cost": cost}


def test_usage_counts_only_the_block_per_distinct_lm_even_when_it_fails(store):
    lm, judge = Recorded(1000), Recorded(2000)
    with pytest.raises(RuntimeError), tracking.run("step", cfg_for(store)) as active, \
            tracking.usage(lm, judge=judge, again=lm, reflection=None):
        lm.history += [Recorded.call(10), Recorded.call(20)]
        judge.history.append(Recorded.call(5, cost=0.25))
        raise RuntimeError("compile failed")
    metrics = mlflow.get_run(active.info.run_id).data.metrics
    assert (metrics["prompt_tokens"], metrics["completion_tokens"], metrics["cost_usd"]) == (30, 2, 1.0)
    assert (metrics["judge_prompt_tokens"], metrics["judge_cost_usd"]) == (5, 0.25)
    assert not any(k.startswith(("again_", "reflection_")) for k in metrics)


def test_usage_survives_dspy_trimming_the_history(store):
    lm = Recorded(1000, 1000, 1000)
    with dspy.context(max_history_size=3), tracking.run("step", cfg_for(store)) as active, tracking.usage(lm):
        for _ in range(4):  # DSPy drops the oldest entry beyond max_history_size
            lm.history = [*lm.history[1:], Recorded.call(7)]
    assert mlflow.get_run(active.info.run_id).data.metrics["prompt_tokens"] == 21  # the 3 calls still known


def test_timed_logs_the_wall_time_of_a_block_even_when_it_fails(store):
    with pytest.raises(RuntimeError), tracking.run("step", cfg_for(store)) as active, tracking.timed("compile"):
        time.sleep(0.2)
        raise RuntimeError("compile failed")
    assert 0.2 <= mlflow.get_run(active.info.run_id).data.metrics["time_compile_s"] < 5
