"""The RAG module: retrieval feeds the prompt, passages shrink to fit a small context window."""

import dspy
from dspy.utils import DummyLM

from pipelines.programs import RAG, context_char_budget, fit_passages

from helpers import FixedRetriever


def test_fit_passages_leaves_short_context_alone_and_shares_the_budget():
    assert fit_passages(["a" * 10, "b" * 10], 100) == (["a" * 10, "b" * 10], False)
    trimmed, was_trimmed = fit_passages(["a" * 100, "b" * 10, "c" * 100], 90)
    assert was_trimmed and [len(p) for p in trimmed] == [30, 10, 30]
    assert fit_passages(["x" * 5000], None) == (["x" * 5000], False)


def test_context_budget_pays_for_answer_scaffolding_and_demos():
    assert context_char_budget(None, 512, 1024, 0) is None
    full = context_char_budget(8192, 512, 1024, 0)
    assert full == (8192 - 512 - 1024) * 3
    assert context_char_budget(8192, 512, 1024, 5000) == full - 5000
    assert context_char_budget(1000, 512, 1024, 0) == 0


def test_rag_answers_from_retrieved_passages_and_reports_them():
    lm = DummyLM([{"reasoning": "from the passages", "response": "use git reset"}])
    program = RAG(FixedRetriever(["p1", "p2", "p3"]), k=2)
    with dspy.context(lm=lm):
        pred = program(question="undo a commit?")
    assert pred.response == "use git reset"
    assert pred.context == ["p1", "p2"] and pred.doc_ids == [0, 1]
    prompt = lm.history[-1]["messages"][-1]["content"]
    assert "p1" in prompt and "p3" not in prompt


def test_rag_trims_passages_that_would_overflow_the_context_window(caplog):
    lm = DummyLM([{"reasoning": "r", "response": "ok"}])
    long = ["word " * 4000] * 5  # 100k characters: far beyond a 2048-token window
    program = RAG(FixedRetriever(long), k=5, context_window=2048, max_tokens=256, reserve_tokens=512)
    with dspy.context(lm=lm), caplog.at_level("INFO", logger="pipelines.programs"):
        pred = program(question="q")
    budget = (2048 - 256 - 512) * 3
    assert sum(map(len, pred.context)) <= budget
    assert "Trimmed 5 passages" in caplog.text


def test_demos_shrink_the_room_left_for_passages():
    program = RAG(FixedRetriever(["x" * 3000] * 5), k=5, context_window=4096, max_tokens=256)
    program.respond.predict.demos = [dspy.Example(question="q", context=["y" * 3000], response="r")]
    lm = DummyLM([{"reasoning": "r", "response": "ok"}] * 2)
    with dspy.context(lm=lm):
        with_demo = sum(map(len, program(question="q").context))
        program.respond.predict.demos = []
        without = sum(map(len, program(question="q").context))
    assert with_demo < without


def test_deepcopy_shares_the_retriever():
    program = RAG(FixedRetriever(["p"]), k=1)
    program.retriever = type("R", (FixedRetriever,), {"__deepcopy__": lambda self, memo: self})(["p"])
    assert program.deepcopy().retriever is program.retriever
