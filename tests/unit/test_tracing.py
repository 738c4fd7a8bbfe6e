"""What one RAG call leaves in a trace: seven spans, one `format` and one `parse` per LM call, the
passages once as the retrieval span's documents."""

import dspy
import mlflow
import numpy as np
from dspy.utils import DummyLM

from pipelines.lm import SchemaJSONAdapter
from pipelines.programs import RAG
from pipelines.retrieval.index import Index, normalize
from pipelines.retrieval.retriever import Retriever


def test_a_rag_trace_has_seven_spans_and_the_passages_as_documents(store):
    mlflow.set_experiment("traces")
    mlflow.dspy.autolog(silent=True)
    index = Index(normalize(np.eye(3, dtype=np.float32)), ["git reset undoes", "df -h", "ssh-keygen"], [7, 8, 9],
                  meta={})
    retriever = Retriever(index, lambda texts: np.tile([1.0, 0.2, 0.0], (len(texts), 1)), k=2)
    adapter = SchemaJSONAdapter()
    lm = DummyLM([{"reasoning": "r", "response": "use git reset"}], adapter=adapter)
    with dspy.context(lm=lm, adapter=adapter):
        RAG(retriever, k=2)(question="how do I undo a commit?")
    mlflow.flush_trace_async_logging()
    trace = mlflow.get_trace(mlflow.get_last_active_trace_id())
    assert [s.name for s in trace.data.spans] == ["RAG.forward", "retrieve", "ChainOfThought.forward",
                                                  "Predict.forward", "SchemaJSONAdapter.format", "DummyLM.__call__",
                                                  "SchemaJSONAdapter.parse"]
    (retrieval,) = [s for s in trace.data.spans if s.span_type == "RETRIEVER"]
    assert [d["metadata"]["doc_id"] for d in retrieval.outputs] == [7, 8]
