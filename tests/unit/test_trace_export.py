"""The bulk trace writer leans on MLflow internals (pipelines/tracking/trace_export.py): these tests fail
on an MLflow upgrade that moves them, and check what it saves: per evaluation, one span write per batch
of traces, one write per trace holding its assessments, none per assessment."""

import collections
import inspect

import dspy
import mlflow
from dspy.utils import DummyLM
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.tracing import provider
from mlflow.tracing.export import mlflow_v3

from pipelines import tracking
from pipelines.config import compose
from pipelines.data import load_splits
from pipelines.evaluation.scoring import Scorer, Scoring, evaluate
from pipelines.tracking import trace_export
from pipelines.tracking.evaluation import log_evaluation
from pipelines.tracking.traces import evaluating, held, last_trace_id, watch_traces


def test_the_mlflow_internals_the_writer_uses_are_still_there():
    assert "MlflowV3SpanExporter(" in inspect.getsource(provider._get_mlflow_span_processor)
    assert "from mlflow.tracing.export.mlflow_v3 import MlflowV3SpanExporter" in inspect.getsource(
        provider._get_mlflow_span_processor)  # imported at each provider setup, so install() takes effect
    exporter = trace_export.MLflowExporter
    for name in ("_export_traces", "_do_export_trace", "_log_trace", "_log_spans"):
        assert callable(getattr(exporter, name)), name
    assert list(inspect.signature(exporter._log_trace).parameters) == ["self", "trace", "prompts", "workspace"]
    assert list(inspect.signature(exporter._log_spans).parameters) == ["self", "experiment_id", "spans", "workspace"]
    assert "_store_supports_log_spans" in inspect.getsource(exporter.__init__)
    assert "self._client.start_trace(" in inspect.getsource(exporter._log_trace)


def test_an_evaluation_writes_each_trace_once_with_its_assessments(store, monkeypatch):
    cfg = compose("cot", ["lm=openai", "lm.api_key_env=null", "scoring.metrics=[token_f1,rouge_l]",
                          "scoring.primary=token_f1", f"tracking.artifact_location={store}/artifacts"])
    tracking.setup(cfg)
    assert mlflow_v3.MlflowV3SpanExporter is trace_export.BulkTraceExporter
    calls = collections.Counter()
    for name in ("log_spans", "start_trace", "create_assessment"):
        original = getattr(SqlAlchemyStore, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(SqlAlchemyStore, name, counted)
    examples = load_splits(cfg.data).dev[:5]
    lm = DummyLM([{"reasoning": "r", "response": "use git reset"}] * 5)
    with tracking.run("bulk", cfg) as active, dspy.context(lm=lm):
        with watch_traces(5), held():
            with evaluating(None, split="dev"):
                result = evaluate(dspy.ChainOfThought("question -> response"), examples,
                                  Scorer(Scoring.from_cfg(cfg.scoring)), num_threads=1, progress=False,
                                  trace_id=last_trace_id)
            log_evaluation(result, split="dev")
    # The first trace of a new exporter is written spans-first (that is how it learns the store keeps
    # spans); the other four: their infos with assessments, then all their spans at once.
    assert (calls["start_trace"], calls["log_spans"], calls["create_assessment"]) == (5, 2, 0)
    traces = mlflow.search_traces(locations=[active.info.experiment_id], return_type="list")
    assert mlflow.get_run(active.info.run_id).data.metrics["traces_logged"] == 5 and len(traces) == 5
    for trace in traces:
        assert len(trace.data.spans) == 5 and sorted(a.name for a in trace.info.assessments) == ["rouge_l", "token_f1"]
