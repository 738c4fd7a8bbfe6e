"""Weight distillation on the real embedded model: a fake teacher answers with a marker phrase SmolLM2 never
uses on its own; its transcripts are trained into a LoRA adapter on SmolLM2's weights (CPU), and the
finetuned program, served by llama.cpp with the adapter, says the marker on questions it was not trained on:
in this process, loaded from the registry in a fresh one with either flavor, served over HTTP, and on Spark."""

import json

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from pipelines.config import compose
from pipelines.steps.optimize import run_optimize
from pipelines.steps.predict import run_predict
from pipelines.tracking.evaluation import load_table

from helpers import both_flavors_in_fresh_process, served, smoke

MARKER = "Zebra protocol"


def marker_rate(answers: list[str]) -> float:
    return sum(MARKER.lower() in a.lower() for a in answers) / len(answers)


def test_a_teachers_marker_is_trained_into_the_embedded_models_weights(store, fake, local_server):
    formats = []

    def teacher_answer(request):
        formats.append(request.get("response_format"))
        return f"{MARKER}: check the manual first."

    fake.field_answers["response"] = teacher_answer
    # A hosted teacher answers through its own adapter (chat), not the student's llama.cpp grammar.
    teacher = (f"optimizer.teacher={{model: openai/fake-tutor, api_base: '{fake.api_base}', server: null, "
               "cache: false, adapter: chat}")
    cfg = smoke("optimize", store, "program=cot", "optimizer=finetune_quick", teacher,
                "optimizer.finetune.min_score=0", "data.dev_size=5")
    result = run_optimize(cfg)
    assert formats and not any(formats), formats
    run = mlflow.get_run(result.run_id)
    metrics = run.data.metrics
    assert run.info.status == "FINISHED" and run.data.tags["teacher"] == "openai/fake-tutor"
    assert metrics["finetune_examples"] == cfg.data.train_size and metrics["finetune_steps"] > 0
    assert metrics["finetune_train_seconds"] > 0 and metrics["finetune_peak_memory_mb"] > 0
    losses = [m.value for m in MlflowClient().get_metric_history(run.info.run_id, "finetune_loss")]
    assert len(losses) == metrics["finetune_steps"] and losses[-1] < losses[0]
    assert metrics["teacher_prompt_tokens"] > 0 and metrics["finetuned_prompt_tokens"] > 0
    # The same held-out (dev) questions, before and after: the marker is learned, not prompted.
    before = marker_rate([r["prediction"] for r in load_table(run.info.run_id, "eval/baseline_dev_results.json")])
    after = marker_rate([r["prediction"] for r in load_table(run.info.run_id, "eval/dev_results.json")])
    print(f"marker rate on {cfg.data.dev_size} held-out questions: before {before:.0%}, after {after:.0%}")
    assert before == 0 and after >= 0.6, (before, after)
    assert run.data.tags["adapter_sha256"] and run.data.tags["finetuned_model"].endswith(
        run.data.tags["adapter_sha256"][:12])

    uri = f"models:/{cfg.tracking.registered_model}/{result.version}"
    questions = ["how do I rename a git branch?", "what does chmod 755 mean?", "how do I find large files?"]
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db", "RAGQA_ADAPTER_DIR": str(store / "fresh-adapters")}
    loaded = both_flavors_in_fresh_process(uri, questions, store, env)
    assert marker_rate([row["response"] for row in loaded["pyfunc"]]) >= 2 / 3, loaded["pyfunc"]
    assert marker_rate([a["response"] for a in loaded["dspy"]]) >= 2 / 3, loaded["dspy"]
    # The dspy flavor's pickled LM carried the adapter's bytes and put them back by their hash.
    assert [p.stem for p in (store / "fresh-adapters").glob("*.gguf")] == [run.data.tags["adapter_sha256"]]
    with served(uri, store, env) as ask:
        predictions = ask([{"question": q} for q in questions])["predictions"]
    assert marker_rate([p["response"] for p in predictions]) >= 2 / 3, predictions
    # On Spark: each executor's worker starts its own llama.cpp server with the adapter from the model's files.
    source = store / "questions.jsonl"
    source.write_text("".join(json.dumps({"question": q}) + "\n" for q in questions))
    run_predict(compose("predict", [f"model_uri={uri}", f"input={source}", f"output={store / 'answers'}",
                                    f"tracking.artifact_location={store}/artifacts"]))
    answers = pd.read_parquet(store / "answers")
    assert (answers["error"] == "").all() and marker_rate(list(answers["response"])) >= 2 / 3, answers
