"""Prompt distillation: a teacher LM bootstraps the demos, the student answers with them. Teacher and
student are two LMs of the one fake server (by model name); the teacher answers in words the student never
uses, so whose answer a demo holds is plain. And the teachers the tutorial's readers can reach."""

import json

import dspy
import mlflow
import pytest

from pipelines.config import compose, to_container
from pipelines.errors import ConfigError
from pipelines.lm import build_adapter, build_lm
from pipelines.steps.optimize import run_optimize
from pipelines.tracking.evaluation import load_table
from pipelines.tracking.models import load_program

from fake_lm import fake_model
from helpers import FAKE_KEY, fake_lm_overrides, smoke

TEACHER, TEACHER_SAYS = "openai/fake-tutor", "the teacher says:"


@pytest.mark.parametrize("preset", ["bootstrap", "mipro_quick"])
def test_the_teachers_answers_become_the_students_demos(preset, store, fake):
    fake.field_answers["response"] = lambda request: (f"{TEACHER_SAYS} use git reset" if "tutor" in request["model"]
                                                      else None)
    student = fake_model(score=0.7, demo_score=1.0)
    embedder = ["embedder=openai", f"embedder.api_base={fake.api_base}", "embedder.api_key_env=null"]
    extra = ["optimizer.num_candidates=3", "optimizer.compile.num_trials=4"] if preset == "mipro_quick" else []
    cfg = smoke("optimize", store, *fake_lm_overrides(fake.api_base, model=student), *embedder,
                f"optimizer={preset}", f"optimizer.teacher={{model: {TEACHER}}}", *extra)
    result = run_optimize(cfg)
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["teacher"] == TEACHER
    # The teacher's tokens are its own metrics, apart from the student's.
    metrics = run.data.metrics
    assert metrics["teacher_prompt_tokens"] > 0 and metrics["prompt_tokens"] > 0
    loaded = load_program(f"models:/{cfg.tracking.registered_model}/{result.version}")
    bootstrapped = [d for d in loaded.respond.predict.demos if d.get("augmented")]
    assert bootstrapped and all(d["response"].startswith(TEACHER_SAYS) for d in bootstrapped), bootstrapped
    # At evaluation the student answers: its own words, never the teacher's.
    answers = [row["prediction"] for row in load_table(run.info.run_id, "eval/dev_results.json")]
    assert answers and not any(TEACHER_SAYS in a for a in answers), answers
    version = mlflow.MlflowClient().get_model_version(cfg.tracking.registered_model, result.version)
    assert version.tags["teacher"] == TEACHER
    assert mlflow.get_logged_model(result.model_uri.removeprefix("models:/")).tags["teacher"] == TEACHER


@pytest.mark.parametrize("preset, key_env, priced", [("deepseek", "DEEPSEEK_API_KEY", True),
                                                     ("qwen", "DASHSCOPE_API_KEY", True), ("ollama", None, False)])
def test_the_services_the_tutorials_readers_reach_answer_through_their_preset(preset, key_env, priced, fake,
                                                                              monkeypatch):
    """DeepSeek, Qwen on DashScope and a local Ollama: only the base URL is pointed at the fake; the key comes
    from the preset's own variable, and the price from LiteLLM where it knows the model."""
    if key_env:
        monkeypatch.setenv(key_env, FAKE_KEY)
    cfg = compose("cot", [f"lm={preset}", f"lm.api_base={fake.api_base}", "lm.cache=false"])
    lm = build_lm(cfg.lm)
    with dspy.context(lm=lm, adapter=build_adapter(cfg.lm)):
        answer = dspy.ChainOfThought("question -> response")(question="how do I undo a commit?")
    assert answer.response.startswith("fake response") and fake.calls == 1
    cost = lm.history[-1].get("cost")
    assert (cost or 0) > 0 if priced else not cost, cost
    assert FAKE_KEY not in json.dumps(to_container(cfg), default=str)
    if key_env:
        monkeypatch.delenv(key_env)
        with pytest.raises(ConfigError, match=key_env):
            build_lm(cfg.lm)
