"""Multi-hop RAG: after the question's own search, the LM writes the next search query from what was found.

What this takes from DSPy's own multi-hop programs, and why:

- Baleen (and DSPy's SimplifiedBaleen) writes a query per hop from the question and the passages found so
  far, keeps passages once, and answers from all of them. Kept: the findings carried forward are the
  passages themselves, once each (by doc id) in the order found, trimmed to the same context budget as
  RAG. So the answer step sees exactly the documents `recall_at_k` is scored on, and no hop pays for an
  extra summarising call.
- The HoVer multi-hop tutorial condenses each hop into notes with a second predictor. Not taken: notes
  cost one more LM call per hop and lose the doc ids, and a small model's notes lose most of the passage.
- STORM's query writer asks for the queries that would cover what is still missing. Kept, as the
  writer's instructions; its many-perspective conversation is out of scope for one question.
- DSPy's Baleen example with assertions asks that each new query differ from the earlier ones. Kept, as
  an input rather than a retry: the writer reads its earlier queries (`past_queries`, the question
  first). Beyond it, a hop's search leaves out the passages found already, so each hop adds up to `k`
  new passages, even when a query repeats, rather than finding the first hop's again.

The first hop searches with the question itself, as RAG does: hop 1 is RAG's retrieval, so each later
hop's `recall_at_k_hop<N>` shows what a written query found that the searches before it had not. The
query writer is a `Predict`, not a Chain of Thought: a query is a few words, and reasoning would double
the cost of every hop.
"""

from __future__ import annotations

import dspy

from pipelines.programs.rag import RAG
from pipelines.retrieval.retriever import passage_key


class WriteQuery(dspy.Signature):
    """Write a search query for the documentation that would answer the question. The passages found so
    far and the queries already searched are given: aim the new query at what the passages do not yet
    cover, in words a relevant document would use, and do not repeat an earlier query."""

    question: str = dspy.InputField()
    past_queries: list[str] = dspy.InputField(desc="queries already searched, the question first")
    context: list[str] = dspy.InputField(desc="passages found so far")
    query: str = dspy.OutputField(desc="a short search query")


class MultiHop(RAG):
    """`hops` searches of up to `k` new passages each: the question's own, then one per query the LM writes
    from the question, its earlier queries and the passages found so far, each search leaving out what
    was found before; `ChainOfThought('context, question -> response')` answers from all of them.
    `hops=1` is RAG."""

    def __init__(self, retriever, *, hops: int = 2, k: int = 5, context_window: int | None = None,
                 max_tokens: int | None = None, reserve_tokens: int = 1024):
        super().__init__(retriever, k=k, context_window=context_window, max_tokens=max_tokens,
                         reserve_tokens=reserve_tokens)
        self.hops = hops
        self.write_query = dspy.Predict(WriteQuery)

    def forward(self, question: str):
        found: dict = {}  # passage_key -> (doc id, passage), in the order found
        queries, hop_doc_ids = [question], []
        for hop in range(self.hops):
            if hop:
                passages = [p for _, p in found.values()]
                context = self.fit(passages, self.write_query, " ".join([question, *queries]))
                queries.append(self.write_query(question=question, past_queries=list(queries),
                                                context=context).query)
            hits = self.retriever(queries[-1], k=self.k, exclude=found.keys())
            hop_doc_ids.append(list(hits.doc_ids))
            for doc_id, passage in zip(hits.doc_ids, hits.passages, strict=True):
                found.setdefault(passage_key(doc_id, passage), (doc_id, passage))
        context = self.fit([p for _, p in found.values()], self.respond.predict, question)
        pred = self.respond(context=context, question=question)
        return dspy.Prediction(**pred, context=context, doc_ids=[d for d, _ in found.values()], queries=queries,
                               hop_doc_ids=hop_doc_ids)
