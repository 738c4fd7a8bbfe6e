"""Ensembles against the fake LM: members that answer differently and the consensus kept, an optimize run's
best candidates as one registered program that loads both ways and serves, samples of one program as
distinct (and cached) calls, and bad members refused in one line before any LM starts."""

from pathlib import Path

import mlflow
import pytest

from pipelines.errors import ConfigError
from pipelines.steps.optimize import run_optimize
from pipelines.steps.variant import run_variant

from fake_lm import fake_model
from helpers import both_flavors_in_fresh_process, fake_lm_overrides, fake_overrides, served, smoke

MODEL = "ragqa-tech-smoke"
# Three nested answers and an outlier: the middle one shares most with the others.
ANSWERS = {"ms1": "git reset --soft HEAD~1 keeps the changes", "ms2": "git reset --soft HEAD~1",
           "ms3": "git reset --soft HEAD~1 keeps the changes staged", "ms4": "reboot the machine and try again"}


def log_cot(store, fake, model: str, *extra: str) -> str:
    """A cot program answering through `model` on the fake, logged and registered; its URI."""
    version = run_variant(smoke("cot", store, *fake_overrides(fake), f"lm.model={model}", *extra)).version
    return f"models:/{MODEL}/{version}"


def by_model(request: dict) -> str | None:
    """The response a member gives, by the word in its LM's name (`openai/fake-ok-ms1` -> ms1)."""
    return next((answer for word, answer in ANSWERS.items() if word in request["model"]), None)


def test_the_consensus_answer_is_kept_and_a_failing_member_is_counted(store, fake):
    fake.field_answers["response"] = by_model
    members = [log_cot(store, fake, fake_model("ok", latency_ms=n)) for n in (1, 2, 3, 4)]
    members.append(log_cot(store, fake, fake_model("garbage")))  # its answers never parse: it fails every time
    result = run_variant(smoke("ensemble", store, *fake_overrides(fake), f"ensemble.members=[{','.join(members)}]"))
    assert result.result.failed == 0
    for row in result.result.rows:
        assert row["prediction"] == ANSWERS["ms1"]
        assert row["candidates"] == [*ANSWERS.values(), ""]
        assert row["member_errors"] == 1 and row["lm_calls"] >= 5  # every member was asked
    run = mlflow.get_run(result.run_id).data
    assert run.metrics["ensemble_members"] == 5 and run.metrics["member_errors"] == result.result.num_examples
    assert run.tags["ensemble.members"] == "; ".join(members) and run.tags["variant"] == "ensemble"


def test_an_optimize_runs_best_candidates_register_load_and_serve_as_one_program(store, fake):
    capable = fake_lm_overrides(fake.api_base, model=fake_model(score=0.7, demo_score=1.0), adapter="json_schema")
    embedder = ["embedder=openai", f"embedder.api_base={fake.api_base}", "embedder.api_key_env=null"]
    optimized = run_optimize(smoke("optimize", store, *capable, *embedder, "optimizer.num_candidates=3",
                                   "optimizer.compile.num_trials=4"))
    kept = mlflow.load_table("optimizer/candidates.json", run_ids=[optimized.run_id])
    assert len(kept) >= 3 and list(kept["rank"]) == sorted(kept["rank"]) and kept["score"].is_monotonic_decreasing
    result = run_variant(smoke("ensemble", store, *capable, *embedder, f"ensemble.candidates_of={optimized.run_id}",
                               "ensemble.size=3"))
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["ensemble_members"] == 3
    members = mlflow.load_table("ensemble/members.json", run_ids=[result.run_id])
    assert [label.split(" of run")[0] for label in members["label"]] == ["candidate 1", "candidate 2", "candidate 3"]
    assert run.data.metrics["lm_calls_per_question"] == 3.0  # the members, each once

    uri = f"models:/{MODEL}/{result.version}"
    files = Path(mlflow.artifacts.download_artifacts(uri))
    assert len(list(files.rglob("embeddings.npy"))) == 1  # three members, one index
    questions = ["how do I undo my last git commit?", "what does df -h show?", "why use bcrypt?"]
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db"}
    loaded = both_flavors_in_fresh_process(uri, questions, store, env)
    assert loaded["type"] == "Ensemble" and len(loaded["predictors"]) == 3  # each candidate's own predictor
    for row, answer in zip(loaded["pyfunc"], loaded["dspy"], strict=True):
        assert row["error"] == "" and len(row["candidates"]) == 3 and len(row["doc_ids"]) == 5
        assert answer["response"] == row["response"]
    with served(uri, store, env) as ask:
        predictions = ask([{"question": q} for q in questions])["predictions"]
    assert len(predictions) == 3 and all(p["response"] and len(p["candidates"]) == 3 for p in predictions)


def test_samples_of_one_program_are_distinct_calls_and_cost_the_same_from_the_cache(store, fake):
    uri = log_cot(store, fake, fake_model("ok"), "lm.cache=true")
    runs, calls = [], []
    for _ in range(2):
        before = fake.calls
        runs.append(run_variant(smoke("ensemble", store, *fake_overrides(fake), f"ensemble.samples_of={uri}",
                                      "ensemble.size=3", "scoring.metrics=[token_f1]", "scoring.primary=token_f1")))
        calls.append(fake.calls - before)
    first, again = runs
    n = first.result.num_examples
    assert calls == [3 * n, 0]  # three rollouts per question, then all from DSPy's cache
    assert first.result.usage == again.result.usage and first.result.usage["lm_calls_per_question"] == 3.0
    assert first.result.usage["tokens_per_question"] > 0


def bad_members(store, fake) -> dict[str, tuple[list[str], str]]:
    """Each bad ensemble as its overrides and the error it must give."""
    cot = log_cot(store, fake, fake_model("ok"))
    other = log_cot(store, fake, fake_model("ok"), "program.signature='question, topic -> response'")
    with mlflow.start_run():  # a model, but not one of this project's programs
        foreign = mlflow.pyfunc.log_model(name="echo", python_model=Echo()).model_uri
    rag_run = run_variant(smoke("rag", store, *fake_overrides(fake))).run_id  # has a program but no candidates
    return {
        "unknown": ([f"ensemble.members=[{cot},{cot},models:/{MODEL}/99]"], f"cannot load models:/{MODEL}/99"),
        "foreign": ([f"ensemble.members=[{cot},{cot},{foreign}]"], "is not a program logged by this project"),
        "inputs": ([f"ensemble.members=[{cot},{cot},{other}]"], "ask for different inputs"),
        "mbr of two": ([f"ensemble.members=[{cot},{cot}]"], "mbr cannot choose between 2 members"),
        "no candidates": ([f"ensemble.candidates_of={rag_run}"], "kept no candidate programs"),
        "one": ([f"ensemble.members=[{cot}]"], "at least 2 members"),
    }


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input):
        return model_input


def test_bad_members_fail_in_one_line_before_any_lm_starts(store, fake):
    cases = bad_members(store, fake)
    runs_before = len(mlflow.search_runs(search_all_experiments=True, output_format="list"))
    for name, (overrides, message) in cases.items():
        calls = fake.calls
        with pytest.raises(ConfigError, match=message) as error:
            run_variant(smoke("ensemble", store, *fake_overrides(fake), *overrides))
        assert "\n" not in str(error.value), name
        assert fake.calls == calls, f"{name}: an LM was called"
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == runs_before  # none opened
