"""A logged program traces one request as one trace, wherever it runs: inside the caller's trace when there
is one (`mlflow.genai.evaluate` with the loaded model as `predict_fn`), else as a trace of its own linked to
the version that answered."""

import contextlib
import time

import mlflow
import pandas as pd
from mlflow.entities import AssessmentSource, AssessmentSourceType
from test_packaging import PICKLE_VARIABLE, in_fresh_process, log_rag_with_demos

from pipelines.config import compose
from pipelines.steps.judge import run_judge, run_review

from helpers import fake_overrides, served, tracking_server

QUESTIONS = ["how do I undo my last git commit?", "how do I free disk space?", "how do I list open ports?"]

# A user's notebook: the champion loaded with plain MLflow, evaluated with a scorer that reads the trace
# and MLflow's RetrievalGroundedness judging through the fake LM.
GENAI_EVALUATE = """
import json, logging, os, sys
import mlflow
import pandas as pd
from mlflow.genai.scorers import RetrievalGroundedness, scorer

uri, base_url = sys.argv[1], sys.argv[2]
warnings = []
handler = logging.Handler(logging.WARNING)
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger("mlflow").addHandler(handler)
model = mlflow.pyfunc.load_model(uri)

answers = {}

def answer(question):
    row = model.predict(pd.DataFrame({"question": [question]})).iloc[0].to_dict()
    answers[question] = row["trace_id"]
    return row

@scorer
def retrieved(trace):
    spans = trace.search_spans(span_type="RETRIEVER")
    return len(spans[0].outputs) if len(spans) == 1 else -len(spans)

os.environ["OPENAI_BASE_URL"] = base_url
result = mlflow.genai.evaluate(data=[{"inputs": {"question": q}} for q in json.loads(sys.argv[3])],
                               predict_fn=answer, scorers=[retrieved, RetrievalGroundedness(model="openai:/fake")])
traces = mlflow.search_traces(run_id=result.run_id, return_type="list")
print("OUT=" + json.dumps({
    "warnings": warnings,
    "traces": [{"question": t.data.request, "spans": len(t.data.spans), "trace_id": t.info.trace_id,
                 "answer_trace": answers[json.loads(t.data.request)["question"]],
                "names": [s.name for s in t.data.spans],
                 "assessments": {a.name: [a.value, a.error is not None] for a in t.info.assessments
                                  if a.name in ("retrieved", "retrieval_groundedness")}} for t in traces]}))
"""


def test_the_loaded_champion_under_genai_evaluate_answers_inside_each_questions_trace(store, user, fake):
    uri, _ = log_rag_with_demos(store, fake)
    fake.field_answers["result"] = lambda request: "yes"  # the groundedness judge's verdict
    out = in_fresh_process(GENAI_EVALUATE, store, {**user, PICKLE_VARIABLE: "false", "OPENAI_API_KEY": "unused"},
                           uri, f"{fake.api_base}", pd.Series(QUESTIONS).to_json(orient="values"))
    assert not [w for w in out["warnings"] if "Failed to log trace" in w], out["warnings"]
    traces = out["traces"]
    assert len(traces) == len(QUESTIONS) and len({t["trace_id"] for t in traces}) == len(QUESTIONS)
    for trace in traces:
        # One trace per question: the program's 7 spans, its RETRIEVER with 5 documents; the answer names it.
        assert trace["names"] == ["RAG.forward", "retrieve", "ChainOfThought.forward", "Predict.forward",
                                  "SchemaJSONAdapter.format", "ProjectLM.__call__", "SchemaJSONAdapter.parse"]
        assert trace["answer_trace"] == trace["trace_id"]
        assert trace["assessments"]["retrieved"] == [5, False]
        assert trace["assessments"]["retrieval_groundedness"] == ["yes", False]
    everywhere = [e.experiment_id for e in mlflow.search_experiments()]
    assert len(mlflow.search_traces(locations=everywhere, return_type="list")) == len(QUESTIONS)  # none apart


# Rows answered on two threads: alone, each its own trace linked to the version; inside a user's traced
# function, all of them inside that one trace.
ON_THREADS = """
import json, sys
import mlflow
import pandas as pd

uri, questions = sys.argv[1], json.loads(sys.argv[2])
model = mlflow.pyfunc.load_model(uri)
alone = model.predict(pd.DataFrame({"question": questions}), params={"num_threads": 2})

@mlflow.trace
def ask(questions):
    return model.predict(pd.DataFrame({"question": questions}), params={"num_threads": 2})

inside = ask(questions)
mlflow.flush_trace_async_logging()
def described(trace_id):
    trace = mlflow.get_trace(trace_id)
    return {"names": [s.name for s in trace.data.spans], "model_id": trace.info.request_metadata.get("mlflow.modelId"),
            "request": trace.data.request}
print("OUT=" + json.dumps({"model_id": model.model_id, "alone": [described(t) | {"id": t} for t in alone["trace_id"]],
                           "inside": [described(t) | {"id": t} for t in inside["trace_id"]]}))
"""


def test_a_loaded_program_traces_each_row_alone_or_inside_the_callers_trace(store, user, fake):
    uri, _ = log_rag_with_demos(store, fake)
    out = in_fresh_process(ON_THREADS, store, {**user, PICKLE_VARIABLE: "false"}, uri,
                           pd.Series(QUESTIONS).to_json(orient="values"))
    alone, inside = out["alone"], out["inside"]
    assert len({t["id"] for t in alone}) == len(QUESTIONS)
    for trace, question in zip(alone, QUESTIONS, strict=True):
        assert trace["names"][:2] == ["RAG.forward", "retrieve"] and len(trace["names"]) == 7
        assert question in trace["request"] and trace["model_id"] == out["model_id"]
    assert len({t["id"] for t in inside}) == 1  # the caller's trace, holding every row's spans
    names = inside[0]["names"]
    assert names[0] == "ask" and names.count("RAG.forward") == names.count("retrieve") == len(QUESTIONS)
    assert len(names) == 1 + 7 * len(QUESTIONS)


# The same rows with tracing switched off in the user's environment.
UNTRACED = """
import json, sys
import mlflow
import pandas as pd

model = mlflow.pyfunc.load_model(sys.argv[1])
rows = model.predict(pd.DataFrame({"question": json.loads(sys.argv[2])}), params={"num_threads": 2})
mlflow.flush_trace_async_logging()
everywhere = [e.experiment_id for e in mlflow.search_experiments()]
print("OUT=" + json.dumps({"trace_ids": list(rows["trace_id"]), "responses": list(rows["response"]),
                           "traces": len(mlflow.search_traces(locations=everywhere, return_type="list"))}))
"""


def test_tracing_switched_off_answers_every_row_and_traces_none(store, user, fake):
    uri, _ = log_rag_with_demos(store, fake)
    before = len(mlflow.search_traces(locations=[e.experiment_id for e in mlflow.search_experiments()],
                                      return_type="list"))
    out = in_fresh_process(UNTRACED, store, {**user, PICKLE_VARIABLE: "false", "RAGQA_TRACING": "false"}, uri,
                           pd.Series(QUESTIONS).to_json(orient="values"))
    assert all(out["responses"]) and out["trace_ids"] == [""] * len(QUESTIONS)
    assert out["traces"] == before


def served_traces(experiment: str, expected: int, timeout: float = 90) -> list:
    """The experiment's traces once `expected` of them are in with their spans (serving exports both
    asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        traces = mlflow.search_traces(locations=[experiment], return_type="list")
        complete = len(traces) >= expected and all(len(t.data.spans) >= 7 for t in traces)
        if complete or time.monotonic() > deadline:
            return traces
        time.sleep(1)


def test_served_requests_are_traced_to_the_experiment_and_linked_to_the_version(tmp_path, user, fake, monkeypatch):
    with contextlib.ExitStack() as tracking:
        server_uri = tracking.enter_context(tracking_server(tmp_path))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server_uri)
        mlflow.set_tracking_uri(server_uri)
        uri, _ = log_rag_with_demos(tmp_path, fake)
        info = mlflow.models.get_model_info(uri)
        experiment = mlflow.get_logged_model(info.model_id).experiment_id
        # MLflow's own settings, and a short retry budget so a stopped server fails its traces quickly.
        env = {"MLFLOW_TRACKING_URI": server_uri, "MLFLOW_EXPERIMENT_ID": experiment,
               "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
        with served(uri, tmp_path, env) as ask:
            answers = [ask({"question": q})["predictions"][0] for q in QUESTIONS]
            traces = served_traces(experiment, len(QUESTIONS))
            assert len(traces) == len(QUESTIONS)
            by_id = {t.info.trace_id: t for t in traces}
            assert {a["trace_id"] for a in answers} == set(by_id)  # each answer names its trace
            for answer, question in zip(answers, QUESTIONS, strict=True):
                trace = by_id[answer["trace_id"]]
                assert question in trace.data.request and answer["error"] == ""
                (retriever,) = trace.search_spans(span_type="RETRIEVER")
                assert [d["id"] for d in retriever.outputs] == [str(d) for d in answer["doc_ids"]]
            # The version's page lists its traffic: the traces are linked to its LoggedModel.
            linked = mlflow.search_traces(locations=[experiment], model_id=info.model_id, return_type="list")
            assert {t.info.trace_id for t in linked} == set(by_id)

            # The version's traffic goes to people for review; their verdicts come back as HUMAN feedback under
            # the judge's label name, a gold answer where they know it, and the judge step measures them.
            assert run_review(compose("review", ["experiment=smoke", f"model_uri={uri}"])).items == len(QUESTIONS)
            person = AssessmentSource(source_type=AssessmentSourceType.HUMAN, source_id="alice")
            for answer, verdict in zip(answers, (True, False, True), strict=True):
                mlflow.log_feedback(trace_id=answer["trace_id"], name="correct", value=verdict, source=person)
            for answer in answers[:2]:  # the third has no gold answer: it cannot be measured
                mlflow.log_expectation(trace_id=answer["trace_id"], name="expected_response",
                                       value="git reset --soft HEAD~1 keeps the changes", source=person)
            judged = run_judge(compose("judge", ["experiment=smoke", *fake_overrides(fake, score=0.7)]))
            metrics = mlflow.get_run(judged.run_id).data.metrics
            assert metrics["judge_labelled_traces"] == 2
            table = mlflow.load_table("judge/disagreements.json", run_ids=[judged.run_id])
            assert set(table["trace_id"]) == {a["trace_id"] for a in answers[:2]}
            assert sorted(table["human"]) == [False, True]

            tracking.close()  # the tracking server stops: requests still answer, the lost traces are one warning
            for question in QUESTIONS[:2]:  # a trace written while answering would retry 7 spans x 3 s
                started = time.monotonic()
                (answer,) = ask({"question": question})["predictions"]
                assert answer["error"] == "" and answer["response"] and time.monotonic() - started < 10
            log = tmp_path / "serve.log"
            deadline = time.monotonic() + 60
            while "trace was not written" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(1)
            assert log.read_text().count("trace was not written") == 1, log.read_text()[-3000:]
