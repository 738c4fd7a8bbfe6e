"""The retriever: the top-k passages of an index for a query, each search a RETRIEVER span in the
trace of the program call that makes it. Read-only, so the copies optimizers make of a program share
one retriever, and one index, instead of copying them.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Collection
from typing import Any

import dspy
import numpy as np

from pipelines.retrieval.index import Index


@contextlib.contextmanager
def retriever_span(query: str, k: int, excluded: int = 0):
    """A RETRIEVER span inside the trace of the program call that retrieves, so MLflow's trace view
    lists the passages as documents; outside a trace (serving, tests), no span and no new trace.
    A process that never imported MLflow has no trace: it is not imported for nothing."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None or mlflow.get_current_active_span() is None:
        yield None
        return
    from mlflow.entities import SpanType

    with mlflow.start_span(name="retrieve", span_type=SpanType.RETRIEVER) as span:
        span.set_inputs({"query": query, "k": k, **({"excluded": excluded} if excluded else {})})
        yield span


def passage_key(doc_id: Any, passage: str) -> Any:
    """What tells two passages apart: the doc id, or the passage itself where the corpus has no ids."""
    return passage if doc_id is None else doc_id


class Retriever:
    """Top-k passages for a query. Read-only, so program copies share one instance."""

    def __init__(self, index: Index, embedder, k: int = 5):
        self.index, self.embedder, self.k = index, embedder, k

    def __call__(self, query: str, k: int | None = None, *, exclude: Collection = ()) -> dspy.Prediction:
        """The `k` passages nearest `query`, leaving out those whose `passage_key` is in `exclude` (what
        earlier searches found): the search reaches that much deeper, so up to `k` come back."""
        k = k or self.k
        with retriever_span(query, k, len(exclude)) as span:
            vector = np.asarray(self.embedder([query]), dtype=np.float32)
            ids, scores = self.index.search(vector, k + len(exclude))[0]
            kept = [(i, s) for i, s in zip(ids, scores, strict=True)
                    if passage_key(self.index.doc_ids[i], self.index.passages[i]) not in exclude][:k]
            hits = dspy.Prediction(passages=[self.index.passages[i] for i, _ in kept],
                                   doc_ids=[self.index.doc_ids[i] for i, _ in kept], scores=[s for _, s in kept])
            if span is not None:
                from mlflow.entities import Document

                span.set_outputs([Document(page_content=p, id=str(d), metadata={"doc_id": d, "score": round(s, 4)})
                                  for p, d, s in zip(hits.passages, hits.doc_ids, hits.scores, strict=True)])
        return hits

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self
