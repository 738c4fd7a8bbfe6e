"""Logged programs load and serve from code and plain files: no pickle is read, no key is written, and a
RAG answers from the index that travelled with it. Old pickled versions load only on the user's word."""

import json
import os
import sys

import dspy
import mlflow
import pytest
from dspy.utils import DummyLM

from pipelines import tracking
from pipelines.config import ConfigError
from pipelines.lm import build_adapter, build_lm
from pipelines.programs import build_program
from pipelines.steps import build_retriever, run_variant

from fake_lm import DEMO_MARKER, FakeLM
from helpers import FAKE_KEY, ROOT, fake_lm_overrides, run_cli, served, smoke

PICKLE_VARIABLE = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
QUESTION = "how do I undo my last git commit?"
LEARNED = "Answer from the passages like a senior engineer would."
DEMO = {"question": "how do I free disk space?", "context": ["df -h shows free disk space"],
        "reasoning": "the passage names the command", "response": "run df -h, then delete", "augmented": True}


@pytest.fixture
def user(store, monkeypatch):
    """A user who has an OpenAI-style key in the environment and has not allowed pickles."""
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    monkeypatch.delenv(PICKLE_VARIABLE, raising=False)
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db"}


def fake_stack(fake: FakeLM) -> list[str]:
    """LM and embedder at the fake, both reading the key from OPENAI_API_KEY, as a hosted setup does; the
    corpus is embedded 16 passages per request, so re-embedding it would take 11 requests."""
    return [*fake_lm_overrides(fake.api_base), "lm.api_key_env=OPENAI_API_KEY", "embedder=openai",
            f"embedder.api_base={fake.api_base}", "embedder.batch_size=16"]


def log_rag_with_demos(store, fake: FakeLM) -> tuple[str, dspy.Module]:
    """A RAG program as an optimizer leaves it (learned instructions, a bootstrapped demo), logged and registered."""
    cfg = smoke("rag", store, *fake_stack(fake))
    tracking.setup(cfg)
    retriever, _ = build_retriever(cfg)
    program = build_program(cfg.program, cfg.lm, retriever)
    predictor = program.respond.predict
    predictor.signature = predictor.signature.with_instructions(LEARNED)
    predictor.demos = [dspy.Example(**DEMO)]
    with mlflow.start_run():
        model = tracking.new_model("rag-mipro", "rag-mipro")
        info = tracking.log_program(program, build_lm(cfg.lm), build_adapter(cfg.lm), model,
                                    tracking.program_signature(retrieves=True))
    version = mlflow.register_model(info.model_uri, "ragqa-packaging").version
    return f"models:/ragqa-packaging/{version}", program


def in_fresh_process(code: str, cwd, env, *args: str) -> dict:
    proc = run_cli([sys.executable, "-c", code, *args], cwd=cwd, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("OUT=", 1)[1])


# Plain MLflow in a directory without the project: the model brings its own code.
PYFUNC = f"""
import importlib.util, json, os, pathlib, sys
import mlflow
assert {PICKLE_VARIABLE!r} not in os.environ and importlib.util.find_spec("pipelines") is None
out = {{}}
for uri in sys.argv[1:]:
    files = [p for p in pathlib.Path(mlflow.artifacts.download_artifacts(uri)).rglob("*") if p.is_file()]
    out[uri] = {{
        "pickles": [p.name for p in files if p.suffix == ".pkl" or p.read_bytes()[:1] == b"\\x80"],
        "with_key": [p.name for p in files if os.environ["OPENAI_API_KEY"].encode() in p.read_bytes()],
        "prediction": mlflow.pyfunc.load_model(uri).predict({{"question": {QUESTION!r}}}),
    }}
print("OUT=" + json.dumps(out))
"""

# The project's loader, which gives back the dspy.Module.
PROJECT = f"""
import json, os, sys
from pipelines.tracking import load_program
out = {{}}
for uri in sys.argv[1:]:
    program = load_program(uri)
    out[uri] = {{"predictors": {{name: {{"instructions": p.signature.instructions, "demos": [dict(d) for d in p.demos]}}
                               for name, p in program.named_predictors()}},
                "answer": program(question={QUESTION!r}).toDict()}}
assert {PICKLE_VARIABLE!r} not in os.environ
print("OUT=" + json.dumps(out))
"""


def test_programs_load_in_a_fresh_process_without_pickles_keys_or_re_embedding(store, user):
    with FakeLM() as fake:
        cot = run_variant(smoke("cot", store, *fake_stack(fake)))
        cot_uri = f"models:/ragqa-tech-smoke/{cot.version}"
        rag_uri, rag = log_rag_with_demos(store, fake)
        expected_ids = rag.retriever(QUESTION).doc_ids
        embedding_calls, calls = fake.embedding_calls, fake.calls
        served_by_mlflow = in_fresh_process(PYFUNC, store, user, cot_uri, rag_uri)
        loaded = in_fresh_process(PROJECT, ROOT, user, cot_uri, rag_uri)
        assert fake.embedding_calls - embedding_calls <= 2  # one question per process, at most
        assert fake.calls - calls == 4  # every answer came from the LM the programs were logged with
    for uri in (cot_uri, rag_uri):
        assert served_by_mlflow[uri]["pickles"] == [] and served_by_mlflow[uri]["with_key"] == []
    assert set(served_by_mlflow[cot_uri]["prediction"]) == {"reasoning", "response"}
    rag_prediction = served_by_mlflow[rag_uri]["prediction"]
    assert rag_prediction["doc_ids"] == expected_ids and len(rag_prediction["context"]) == 5
    assert rag_prediction["response"] == f"fake response {DEMO_MARKER}"  # the demo reached the prompt
    default = dspy.ChainOfThought("question -> response").predict.signature.instructions
    assert loaded[cot_uri]["predictors"] == {"predict": {"instructions": default, "demos": []}}
    assert loaded[rag_uri]["predictors"] == {"respond.predict": {"instructions": LEARNED, "demos": [DEMO]}}
    assert loaded[rag_uri]["answer"]["doc_ids"] == expected_ids
    assert loaded[rag_uri]["answer"]["response"] == rag_prediction["response"]


def test_a_served_version_answers_with_pickles_refused(store, user):
    with FakeLM() as fake:
        uri, rag = log_rag_with_demos(store, fake)
        # MLflow 3.17 reads the unset variable as true; false makes it refuse any pickle it meets.
        with served(uri, store, {**user, PICKLE_VARIABLE: "false"}) as ask:
            answer = ask(QUESTION)["predictions"]
        assert answer["doc_ids"] == rag.retriever(QUESTION).doc_ids
    assert answer["response"] == f"fake response {DEMO_MARKER}" and answer["reasoning"]


def test_a_pickled_version_loads_only_when_the_user_opts_in(store, monkeypatch):
    monkeypatch.delenv(PICKLE_VARIABLE, raising=False)
    program = dspy.ChainOfThought("question -> response")
    program.predict.signature = program.predict.signature.with_instructions(LEARNED)
    experiment = mlflow.create_experiment("pickled", artifact_location=(store / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment), dspy.context(lm=None, callbacks=[]):
        uri = mlflow.dspy.log_model(program, name="program").model_uri  # how older versions logged
    with pytest.raises(ConfigError) as error:
        tracking.load_program(uri)
    assert "\n" not in str(error.value) and f"set {PICKLE_VARIABLE}=true" in str(error.value)
    assert PICKLE_VARIABLE not in os.environ

    monkeypatch.setenv(PICKLE_VARIABLE, "true")
    loaded = tracking.load_program(uri)
    with dspy.context(lm=DummyLM([{"reasoning": "r", "response": "from the pickle"}])):
        answer = loaded(question=QUESTION)
    assert loaded.predict.signature.instructions == LEARNED and answer.response == "from the pickle"


def test_only_the_projects_programs_are_logged():
    program = dspy.Predict("question -> response")
    with pytest.raises(ConfigError, match="cannot log a Predict"):
        tracking.log_program(program, dspy.LM("openai/x"), dspy.ChatAdapter(), None, None)
