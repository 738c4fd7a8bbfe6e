"""RAG: retrieve `k` passages for the question, answer from them with Chain of Thought."""

from __future__ import annotations

import logging

import dspy

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 3  # conservative for English technical text; keeps estimates on the safe side


def context_char_budget(context_window: int | None, max_tokens: int | None, reserve_tokens: int,
                        used_chars: int) -> int | None:
    """Characters left for passages once the answer, the prompt scaffolding and the demos are paid for."""
    if not context_window:
        return None
    free_tokens = context_window - (max_tokens or 0) - reserve_tokens
    return max(0, free_tokens * CHARS_PER_TOKEN - used_chars)


def fit_passages(passages: list[str], budget: int | None) -> tuple[list[str], bool]:
    """Shorten passages, each to an equal share, so together they fit `budget` characters."""
    if budget is None or sum(map(len, passages)) <= budget:
        return list(passages), False
    share = max(budget // max(len(passages), 1), 0)
    return [p[:share] for p in passages], True


def prompt_chars(predictor: dspy.Predict) -> int:
    """Characters a predictor's instructions and demos add to each of its prompts."""
    demo_chars = sum(len(str(v)) for demo in predictor.demos for v in dict(demo).values())
    return demo_chars + len(predictor.signature.instructions)


class RAG(dspy.Module):
    """Retrieve `k` passages, then answer with `ChainOfThought('context, question -> response')`.

    The retriever is an attribute; a logged program carries its index as files (pipelines/packaging.py).
    `context_window` (tokens) is set for small local LMs: passages are trimmed to fit next to the
    instructions and demos, rather than letting the server reject an overlong prompt.
    """

    def __init__(self, retriever, *, k: int = 5, context_window: int | None = None, max_tokens: int | None = None,
                 reserve_tokens: int = 1024):
        super().__init__()
        self.retriever = retriever
        self.k = k
        self.context_window = context_window
        self.max_tokens = max_tokens
        self.reserve_tokens = reserve_tokens
        self.respond = dspy.ChainOfThought("context, question -> response")

    def fit(self, passages: list[str], predictor: dspy.Predict, inputs: str) -> list[str]:
        """`passages` trimmed to the room `predictor`'s prompt leaves in the context window beside its
        other `inputs` (their text: the question, and whatever else the prompt carries)."""
        budget = context_char_budget(self.context_window, self.max_tokens, self.reserve_tokens,
                                     prompt_chars(predictor) + len(inputs))
        context, trimmed = fit_passages(passages, budget)
        if trimmed:
            log.info("Trimmed %d passages to %d chars each to fit a %d-token context",
                     len(context), budget // max(len(context), 1), self.context_window)
        return context

    def forward(self, question: str):
        hits = self.retriever(question, k=self.k)
        context = self.fit(hits.passages, self.respond.predict, question)
        pred = self.respond(context=context, question=question)
        # A new Prediction: `pred` is also the predictor's output recorded in DSPy's trace, and
        # optimizers build demos from it; extra fields there collide with the demo's inputs.
        return dspy.Prediction(**pred, context=context, doc_ids=hits.doc_ids)
