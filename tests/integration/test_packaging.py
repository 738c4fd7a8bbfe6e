"""Logged programs load both ways in a fresh process: `mlflow.pyfunc.load_model` (and serving) from code
and plain files with pickles refused, answering batches; `mlflow.dspy.load_model` as the tutorial ends.
No key is written, a RAG answers from the index that travelled with it, and without the `dspy` flavor
no file of the model is a pickle. Old pickle-only versions load only on the user's word."""

import json
import os
import pathlib
import sys

import dspy
import mlflow
import pytest
from dspy.utils import DummyLM

from pipelines import tracking
from pipelines.errors import ConfigError
from pipelines.lm import build_adapter, build_lm
from pipelines.programs import build_program
from pipelines.steps.session import build_retriever
from pipelines.steps.variant import run_variant
from pipelines.tracking.models import load_program, log_program, new_model, program_signature

from fake_lm import DEMO_MARKER
from helpers import ROOT, fake_lm_overrides, run_cli, served, smoke

PICKLE_VARIABLE = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
QUESTION = "how do I undo my last git commit?"
LEARNED = "Answer from the passages like a senior engineer would."
DEMO = {"question": "how do I free disk space?", "context": ["df -h shows free disk space"],
        "reasoning": "the passage names the command", "response": "run df -h, then delete", "augmented": True}


def fake_stack(fake) -> list[str]:
    """LM and embedder at the fake, both reading the key from OPENAI_API_KEY, as a hosted setup does; the
    corpus is embedded 16 passages per request, so re-embedding it would take 11 requests."""
    return [*fake_lm_overrides(fake.api_base), "lm.api_key_env=OPENAI_API_KEY", "embedder=openai",
            f"embedder.api_base={fake.api_base}", "embedder.batch_size=16"]


def log_rag_with_demos(store, fake, *, dspy_flavor: bool = True) -> tuple[str, dspy.Module]:
    """A RAG program as an optimizer leaves it (learned instructions, a bootstrapped demo), logged and registered."""
    cfg = smoke("rag", store, *fake_stack(fake))
    tracking.setup(cfg)
    retriever, _ = build_retriever(cfg)
    program = build_program(cfg.program, cfg.lm, retriever)
    predictor = program.respond.predict
    predictor.signature = predictor.signature.with_instructions(LEARNED)
    predictor.demos = [dspy.Example(**DEMO)]
    calls = fake.calls
    with mlflow.start_run():
        model = new_model("rag-mipro", variant="rag-mipro")
        info = log_program(program, lm=build_lm(cfg.lm), adapter=build_adapter(cfg.lm), model=model,
                           signature=program_signature(program, num_threads=3),
                           dspy_flavor=dspy_flavor)
    assert fake.calls == calls  # its input example is saved, not answered, as it is logged
    version = mlflow.register_model(info.model_uri, "ragqa-packaging").version
    return f"models:/ragqa-packaging/{version}", program


def in_fresh_process(code: str, cwd, env, *args: str) -> dict:
    proc = run_cli([sys.executable, "-c", code, *args], cwd=cwd, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("OUT=", 1)[1])


def pickles(directory) -> list[str]:
    """Files that are pickles, by name or by their first byte (protocol 2+ starts with 0x80)."""
    return sorted(p.name for p in pathlib.Path(directory).rglob("*")
                  if p.is_file() and (p.suffix == ".pkl" or p.read_bytes()[:1] == b"\x80"))


# Plain MLflow, pickles refused, in a directory without the project: the model brings its own code.
PYFUNC = f"""
import importlib.util, json, os, pathlib, sys
import mlflow
assert os.environ[{PICKLE_VARIABLE!r}] == "false" and importlib.util.find_spec("pipelines") is None
out = {{}}
for uri in sys.argv[1:]:
    files = [p for p in pathlib.Path(mlflow.artifacts.download_artifacts(uri)).rglob("*") if p.is_file()]
    answers = mlflow.pyfunc.load_model(uri).predict([{{"question": {QUESTION!r}}}, {{"question": ""}},
                                                     {{"question": "how do I free disk space?"}}])
    out[uri] = {{"with_key": [p.name for p in files if os.environ["OPENAI_API_KEY"].encode() in p.read_bytes()],
                "answers": answers.to_dict(orient="records")}}
print("OUT=" + json.dumps(out, default=list))
"""

# MLflow's DSPy flavor, as the tutorial loads its program: a dspy.Module, DSPy configured.
DSPY = f"""
import json, sys
import dspy, mlflow
out = {{}}
for uri in sys.argv[1:]:
    program = mlflow.dspy.load_model(uri)
    out[uri] = {{"predictors": {{name: {{"instructions": p.signature.instructions, "demos": [dict(d) for d in p.demos]}}
                               for name, p in program.named_predictors()}},
                "answer": program(question={QUESTION!r}).toDict(), "lm": dspy.settings.lm.model}}
print("OUT=" + json.dumps(out))
"""

# The project's loader: the dspy.Module rebuilt from plain files, no pickle read.
PROJECT = f"""
import json, os, sys
from pipelines.tracking.models import load_program
out = {{}}
for uri in sys.argv[1:]:
    program = load_program(uri)
    out[uri] = {{"instructions": [p.signature.instructions for _, p in program.named_predictors()],
                "answer": program(question={QUESTION!r}).toDict()}}
print("OUT=" + json.dumps(out))
"""


def test_programs_load_both_ways_in_a_fresh_process_without_keys_or_re_embedding(store, user, fake):
    cot = run_variant(smoke("cot", store, *fake_stack(fake)))
    cot_uri = f"models:/ragqa-tech-smoke/{cot.version}"
    rag_uri, rag = log_rag_with_demos(store, fake)
    expected_ids = rag.retriever(QUESTION).doc_ids
    embedding_calls, calls = fake.embedding_calls, fake.calls
    by_pyfunc = in_fresh_process(PYFUNC, store, {**user, PICKLE_VARIABLE: "false"}, cot_uri, rag_uri)
    by_dspy = in_fresh_process(DSPY, store, user, cot_uri, rag_uri)
    by_project = in_fresh_process(PROJECT, ROOT, {**user, PICKLE_VARIABLE: "false"}, rag_uri)
    assert fake.embedding_calls - embedding_calls <= 5  # questions only, never the corpus (11 requests)
    assert fake.calls - calls == 2 * 2 + 2 + 1  # every answer came from the LM the programs were logged with
    for uri in (cot_uri, rag_uri):
        assert by_pyfunc[uri]["with_key"] == []
        first, empty, third = by_pyfunc[uri]["answers"]  # in order; the empty question fails alone
        assert first["error"] == third["error"] == "" and first["response"] and third["response"]
        assert empty["error"] == "empty question" and empty["response"] == ""
    assert set(by_pyfunc[cot_uri]["answers"][0]) == {"reasoning", "response", "error", "trace_id"}
    rag_answer = by_pyfunc[rag_uri]["answers"][0]
    assert rag_answer["doc_ids"] == expected_ids and len(rag_answer["context"]) == 5
    assert rag_answer["response"] == f"fake response {DEMO_MARKER}"  # the demo reached the prompt
    default = dspy.ChainOfThought("question -> response").predict.signature.instructions
    assert by_dspy[cot_uri]["predictors"] == {"predict": {"instructions": default, "demos": []}}
    assert by_dspy[rag_uri]["predictors"] == {"respond.predict": {"instructions": LEARNED, "demos": [DEMO]}}
    assert by_dspy[rag_uri]["answer"]["doc_ids"] == expected_ids and by_dspy[rag_uri]["lm"] == "openai/fake"
    assert by_dspy[rag_uri]["answer"]["response"] == by_project[rag_uri]["answer"]["response"] == rag_answer[
        "response"]
    assert by_project[rag_uri]["instructions"] == [LEARNED]


def test_without_the_dspy_flavor_no_file_is_a_pickle(store, user, fake):
    uri, _ = log_rag_with_demos(store, fake, dspy_flavor=False)
    files = mlflow.artifacts.download_artifacts(uri)
    assert pickles(files) == [] and "dspy" not in mlflow.models.get_model_info(uri).flavors
    with_flavor, _ = log_rag_with_demos(store, fake)
    assert pickles(mlflow.artifacts.download_artifacts(with_flavor))  # MLflow's dspy flavor is a cloudpickle


def test_the_served_champion_answers_a_batch_in_order_with_pickles_refused(store, user, fake):
    uri, rag = log_rag_with_demos(store, fake)
    mlflow.MlflowClient().set_registered_model_alias("ragqa-packaging", "champion", uri.rsplit("/", 1)[1])
    # MLflow 3.17 reads the unset variable as true; false makes it refuse any pickle it meets.
    with served("models:/ragqa-packaging@champion", store, {**user, PICKLE_VARIABLE: "false"}) as ask:
        single = ask({"question": QUESTION})["predictions"]
        batch = ask([{"question": "how do I free disk space?"}, {"question": " "}, {"question": QUESTION}])
        shown = mlflow.artifacts.download_artifacts(f"{uri}/serving_input_example.json")
        example = ask(pathlib.Path(shown).read_text())
    assert len(single) == 1 and single[0]["doc_ids"] == rag.retriever(QUESTION).doc_ids
    assert single[0]["response"] == f"fake response {DEMO_MARKER}" and single[0]["error"] == ""
    first, empty, third = batch["predictions"]
    assert first["doc_ids"] == rag.retriever("how do I free disk space?").doc_ids and first["error"] == ""
    assert empty["error"] == "empty question" and empty["response"] == "" and empty["doc_ids"] == []
    assert third["trace_id"] != single[0]["trace_id"]  # a trace per request
    assert {**third, "trace_id": ""} == {**single[0], "trace_id": ""}
    (answer,) = example["predictions"]  # the request shown with the model in the UI works as it is
    assert answer["error"] == "" and answer["response"] and len(answer["doc_ids"]) == 5


def test_a_pickled_version_loads_only_when_the_user_opts_in(store, monkeypatch):
    monkeypatch.delenv(PICKLE_VARIABLE, raising=False)
    program = dspy.ChainOfThought("question -> response")
    program.predict.signature = program.predict.signature.with_instructions(LEARNED)
    experiment = mlflow.create_experiment("pickled", artifact_location=(store / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment), dspy.context(lm=None, callbacks=[]):
        uri = mlflow.dspy.log_model(program, name="program").model_uri  # how older versions logged
    with pytest.raises(ConfigError) as error:
        load_program(uri)
    assert "\n" not in str(error.value) and f"set {PICKLE_VARIABLE}=true" in str(error.value)
    assert PICKLE_VARIABLE not in os.environ

    monkeypatch.setenv(PICKLE_VARIABLE, "true")
    loaded = load_program(uri)
    with dspy.context(lm=DummyLM([{"reasoning": "r", "response": "from the pickle"}])):
        answer = loaded(question=QUESTION)
    assert loaded.predict.signature.instructions == LEARNED and answer.response == "from the pickle"


def test_only_the_projects_programs_are_logged(store):
    program = dspy.Predict("question -> response")
    with mlflow.start_run(), pytest.raises(ConfigError, match="cannot log a Predict"):
        log_program(program, lm=dspy.LM("openai/x"), adapter=dspy.ChatAdapter(),
                    model=new_model("predict", variant="predict"),
                    signature=program_signature(program), dspy_flavor=True)
