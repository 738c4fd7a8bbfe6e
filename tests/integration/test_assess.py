"""`mlflow run . -e assess`: stored traces scored after the fact by MLflow's judges and the project's metrics,
one evaluation run with each scorer's mean and interval, the assessments on the traces."""

import time
from datetime import datetime

import mlflow
import pytest

from pipelines.config import compose
from pipelines.errors import ConfigError
from pipelines.steps.assess import run_assess
from pipelines.steps.variant import run_variant

from helpers import fake_overrides, mlflow_run, smoke


def test_assess_scores_a_rag_runs_traces_with_a_judge_and_a_metric(store, fake):
    rag = run_variant(smoke("rag", store, *fake_overrides(fake)))
    traces = mlflow.search_traces(run_id=rag.run_id, return_type="list")
    assert traces
    fake.field_answers["result"] = lambda request: "yes"  # MLflow's groundedness judge says yes
    overrides = " ".join([f"run_id={rag.run_id}", "scorers=[retrieval_groundedness,token_f1]",
                          *fake_overrides(fake)])
    proc = mlflow_run("assess", store, f"experiment=smoke {overrides}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run,) = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
              if r.info.run_name == "assess"]
    metrics = run.data.metrics
    assert metrics["traces"] == len(traces) and metrics["retrieval_groundedness_n"] == len(traces)
    assert metrics["retrieval_groundedness"] == 100.0  # every answer judged grounded
    assert metrics["token_f1_n"] == len(traces)  # each trace's gold answer came from the run's table
    expected = sum(r["token_f1"] for r in rag.result.rows if r.get("trace_id")) / len(traces)
    assert metrics["token_f1"] == pytest.approx(expected, abs=0.01)  # the project's own token F1, re-scored
    assert metrics["token_f1_ci_low"] <= metrics["token_f1"] <= metrics["token_f1_ci_high"]
    for trace in mlflow.search_traces(run_id=rag.run_id, return_type="list"):  # the scores sit on the traces
        names = {a.name for a in trace.info.assessments}
        assert {"retrieval_groundedness", "token_f1"} <= names
    assert "sk-" not in proc.stdout + proc.stderr


def test_assess_refuses_bad_scorers_and_says_how_to_get_traces(store, fake):
    with pytest.raises(ConfigError, match="no scorer named bogus"):
        run_assess(compose("assess", ["experiment=smoke", "scorers=[token_f1,bogus]"]))
    rag = run_variant(smoke("rag", store, *fake_overrides(fake)))
    runs = len(mlflow.search_runs(search_all_experiments=True, output_format="list"))
    # The version was evaluated, never served: no traffic to assess.
    with pytest.raises(ConfigError, match="has no traces: traces come from"):
        run_assess(compose("assess", ["experiment=smoke", f"model_uri={rag.model_uri}", "scorers=[token_f1]"]))
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == runs  # no run opened


def test_assess_takes_the_experiments_traces_within_a_time_window(store, fake):
    first = run_variant(smoke("rag", store, *fake_overrides(fake)))
    time.sleep(0.05)
    between = datetime.now().isoformat()
    second = run_variant(smoke("rag", store, *fake_overrides(fake), "data.dev_size=2"))
    fake.field_answers["result"] = lambda request: "yes"
    scorers = ["scorers=[retrieval_groundedness]", *fake_overrides(fake)]
    later = run_assess(smoke("assess", store, f"since={between}", *scorers))
    assert later.traces == len(mlflow.search_traces(run_id=second.run_id, return_type="list")) == 2
    everything = run_assess(smoke("assess", store, *scorers))
    assert everything.traces == later.traces + len(mlflow.search_traces(run_id=first.run_id, return_type="list"))
    assert everything.estimates["retrieval_groundedness"].n == everything.traces
    with pytest.raises(ConfigError, match="has no traces between the start and 2000-01-01"):
        run_assess(smoke("assess", store, "until=2000-01-01", *scorers))
    with pytest.raises(ConfigError, match="since=yesterday: not an ISO date"):
        run_assess(smoke("assess", store, "since=yesterday", *scorers))
