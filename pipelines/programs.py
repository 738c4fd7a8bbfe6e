"""The tutorial's programs: a Chain-of-Thought baseline and RAG over the retriever."""

from __future__ import annotations

import logging

import dspy

from pipelines.config import ConfigError
from pipelines.schema import LMConfig, ProgramConfig, ProgramName

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


class RAG(dspy.Module):
    """Retrieve `k` passages, then answer with `ChainOfThought('context, question -> response')`.

    The retriever is an attribute; a logged program carries its index as files (pipelines/packaging.py).
    `context_window` (tokens) is set for small local LMs: passages are trimmed to fit next to the
    instructions and demos, rather than letting the server reject an overlong prompt.
    """

    def __init__(self, retriever, k: int = 5, context_window: int | None = None,
                 max_tokens: int | None = None, reserve_tokens: int = 1024):
        super().__init__()
        self.retriever = retriever
        self.k = k
        self.context_window = context_window
        self.max_tokens = max_tokens
        self.reserve_tokens = reserve_tokens
        self.respond = dspy.ChainOfThought("context, question -> response")

    def _demo_chars(self) -> int:
        predictor = self.respond.predict
        demo_chars = sum(len(str(v)) for demo in predictor.demos for v in dict(demo).values())
        return demo_chars + len(predictor.signature.instructions)

    def forward(self, question: str):
        hits = self.retriever(question, k=self.k)
        budget = context_char_budget(self.context_window, self.max_tokens, self.reserve_tokens,
                                     self._demo_chars() + len(question))
        context, trimmed = fit_passages(hits.passages, budget)
        if trimmed:
            log.info("Trimmed %d passages to %d chars each to fit a %d-token context",
                     len(context), budget // max(len(context), 1), self.context_window)
        pred = self.respond(context=context, question=question)
        # A new Prediction: `pred` is also the predictor's output recorded in DSPy's trace, and
        # optimizers build demos from it; extra fields there collide with the demo's inputs.
        return dspy.Prediction(**pred, context=context, doc_ids=hits.doc_ids)


def build_program(program_cfg: ProgramConfig, lm_cfg: LMConfig, retriever=None) -> dspy.Module:
    if program_cfg.name == ProgramName.cot:
        return dspy.ChainOfThought(program_cfg.signature)
    if retriever is None:
        raise ConfigError("the rag program needs a retriever")
    return RAG(retriever, k=program_cfg.k, context_window=lm_cfg.context_window,
               max_tokens=lm_cfg.max_tokens, reserve_tokens=program_cfg.reserve_tokens)
