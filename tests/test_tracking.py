"""Run lifecycle, config logging and champion promotion against a temporary store."""

import dspy
import mlflow
import pytest
from omegaconf import OmegaConf

from pipelines import tracking


def cfg_for(store):
    return OmegaConf.create({"lm": {"model": "m", "api_key": "sk-secret", "api_key_env": "X"},
                             "tracking": {"uri": mlflow.get_tracking_uri(), "experiment": "t"}})


def test_promotion_rules():
    assert tracking.decide_promotion(None, 10.0, "dev1")[0]
    champion = {"dev_semantic_f1": "50.0", "dev_set": "dev1"}
    assert tracking.decide_promotion(champion, 60.0, "dev1")[0]
    assert not tracking.decide_promotion(champion, 50.0, "dev1")[0]
    promoted, reason = tracking.decide_promotion(champion, 99.0, "dev2")
    assert not promoted and "another dev set" in reason


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


def test_register_moves_champion_only_on_improvement(store):
    def logged_model(score):
        with mlflow.start_run():
            info = mlflow.pyfunc.log_model(name="m", python_model=lambda inputs: inputs,
                                           input_example=["x"], pip_requirements=[])
            return tracking.register(info.model_uri, "reg", score, "dev1", "v")

    assert logged_model(40.0)["promoted"]
    assert not logged_model(30.0)["promoted"]
    third = logged_model(55.0)
    assert third["promoted"]
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("reg", tracking.CHAMPION)
    assert champion.version == third["version"] and champion.tags["dev_semantic_f1"] == "55.0000"
    assert champion.tags["champion_dev_semantic_f1_at_registration"] == "40.0000"


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
        cot_prompts = tracking.register_prompts(cot, "reg", "cot")
        tracking.link_prompts(cot_prompts, "reg", "1", promoted=True)
        (prompt,) = cot_prompts
        assert prompt.name == "reg.predict" and prompt.variables == set()
        assert prompt.template == [
            {"role": "system", "content": "Answer tersely."},
            {"role": "user", "content": "question: undo a commit?"},
            {"role": "assistant", "content": "reasoning: r\n\nresponse: git reset { { HEAD }}"}]
        assert prompt.tags["braces_escaped"] == "true" and prompt.tags["demos"] == "1"
        assert mlflow.genai.load_prompt("prompts:/reg.predict@champion").version == prompt.version
        rag_prompts = tracking.register_prompts(rag, "reg", "rag")
        tracking.link_prompts(rag_prompts, "reg", "2", promoted=True)
    champion = mlflow.genai.load_prompt("prompts:/reg.predict@champion", allow_missing=True, cache_ttl_seconds=0)
    assert champion is None  # the new champion has no `predict` predictor
    assert mlflow.genai.load_prompt("prompts:/reg.predict/1").tags["model_version"] == "1"
    rag_champion = mlflow.genai.load_prompt("prompts:/reg.respond.predict@champion")
    assert rag_champion.template[0]["content"] == "Use the context. Jinja { % if %} stays text."
