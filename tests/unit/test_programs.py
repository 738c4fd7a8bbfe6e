"""The programs: RAG's passages shrink to fit a small context window; multihop writes its later queries and
keeps each document once; an ensemble keeps the consensus answer and survives a failing member."""

import json

import dspy
import numpy as np
import pytest
from dspy.utils import DummyLM

from pipelines.config import compose
from pipelines.errors import ConfigError
from pipelines.programs import (
    RAG,
    Ensemble,
    Member,
    MembersFailed,
    MultiHop,
    build_program,
    context_char_budget,
    fit_passages,
    mbr_pick,
)

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


class WordRetriever:
    """Top-k passages by words shared with the query, leaving out the doc ids in `exclude`; doc ids are
    given. Records every query."""

    def __init__(self, docs: dict):
        self.docs, self.queries = docs, []

    def __call__(self, query, k=None, exclude=()):
        self.queries.append(query)
        words = set(query.lower().split())
        ranked = sorted((d for d in self.docs if d not in exclude),
                        key=lambda d: (-len(words & set(self.docs[d].lower().split())), str(d)))[:k]
        return dspy.Prediction(passages=[self.docs[d] for d in ranked], doc_ids=ranked)


DOCS = {11: "git reset soft keeps changes", 12: "git stash saves work", 13: "reflog finds lost commits",
        14: "ssh keys live in dot ssh"}


def test_multihop_writes_the_second_query_and_keeps_each_document_once_in_first_seen_order():
    retriever = WordRetriever(DOCS)
    lm = DummyLM([{"query": "reflog lost commits"}, {"reasoning": "r", "response": "use the reflog"}])
    program = MultiHop(retriever, hops=2, k=2)
    with dspy.context(lm=lm):
        pred = program(question="git undo a reset")
    assert retriever.queries == ["git undo a reset", "reflog lost commits"]  # the question, then the written one
    assert pred.queries == retriever.queries and pred.response == "use the reflog"
    first, second = pred.hop_doc_ids
    # The second search leaves out what the first found: without that, 11 (no closer to the query than 14,
    # but first by id) would come back in 14's place.
    assert first == [11, 12] and second == [13, 14]
    assert pred.doc_ids == first + second and len(pred.context) == len(pred.doc_ids)
    # The query writer read what the first search found and the query it ran; the answer step read every passage.
    writer_prompt, answer_prompt = (entry["messages"][-1]["content"] for entry in lm.history)
    assert DOCS[11] in writer_prompt and DOCS[13] not in writer_prompt
    assert "past_queries" in writer_prompt and '["git undo a reset"]' in writer_prompt
    assert all(DOCS[d] in answer_prompt for d in pred.doc_ids)
    assert [name for name, _ in program.named_predictors()] == ["respond.predict", "write_query"]


def test_each_hop_finds_new_documents_even_when_the_writer_repeats_itself():
    retriever = WordRetriever(DOCS)
    lm = DummyLM([{"query": "git reset"}, {"query": "git reset"}, {"reasoning": "r", "response": "ok"}])
    with dspy.context(lm=lm):
        pred = MultiHop(retriever, hops=3, k=1)(question="git undo a reset")
    assert pred.queries == ["git undo a reset", "git reset", "git reset"]
    assert pred.hop_doc_ids == [[11], [12], [13]] and pred.doc_ids == [11, 12, 13]  # without exclusion: 11 each time
    second_writer = lm.history[1]["messages"][-1]["content"]
    assert '["git undo a reset", "git reset"]' in second_writer  # it was told which queries it had run


def test_a_multihop_program_round_trips_as_files_and_an_older_query_writer_is_refused(tmp_path):
    from pipelines import packaging
    from pipelines.lm import build_adapter, build_lm
    from pipelines.retrieval.embedders import LocalEmbedder
    from pipelines.retrieval.index import Index
    from pipelines.retrieval.retriever import Retriever

    cfg = compose("multihop")
    index = Index(np.eye(4, dtype=np.float32), list(DOCS.values()), list(DOCS), meta={"embedder": {"kind": "local"}})
    program = MultiHop(Retriever(index, dspy.Embedder(LocalEmbedder()), k=1), hops=3, k=1)
    program.write_query.signature = program.write_query.signature.with_instructions("aim at what is missing")
    packaging.save(program, build_lm(cfg.lm), build_adapter(cfg.lm), tmp_path / "program")
    loaded = packaging.load(tmp_path / "program").program
    assert type(loaded) is MultiHop and loaded.hops == 3
    assert loaded.write_query.signature.instructions == "aim at what is missing"
    assert list(loaded.write_query.signature.input_fields) == ["question", "past_queries", "context"]
    spec_file = tmp_path / "program" / packaging.SPEC
    spec = json.loads(spec_file.read_text())
    del spec["program"]["query_inputs"]  # as this project wrote it before the writer read its past queries
    spec_file.write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="query writer reads question, context; this project's reads question, "
                       "past_queries, context: re-run") as error:
        packaging.load(tmp_path / "program")
    assert "\n" not in str(error.value)


def test_one_hop_is_rag():
    lm = DummyLM([{"reasoning": "r", "response": "ok"}])
    with dspy.context(lm=lm):
        pred = MultiHop(WordRetriever(DOCS), hops=1, k=2)(question="git stash")
    assert len(lm.history) == 1 and pred.queries == ["git stash"] and pred.hop_doc_ids == [pred.doc_ids]


@pytest.mark.parametrize("override, message", [("program.hops=0", "program.hops=0: multihop needs at least 1 hop"),
                                               ("program.k=0", "program.k=0: a retrieving program needs at least 1")])
def test_bad_multihop_settings_fail_in_one_line(override, message):
    cfg = compose("multihop", [override])
    with pytest.raises(ConfigError, match=message) as error:
        build_program(cfg.program, cfg.lm, WordRetriever(DOCS))
    assert "\n" not in str(error.value)


def test_mbr_picks_the_answer_that_agrees_most_with_the_others():
    # The middle one of three nested answers shares most with the other two; the outlier shares nothing.
    answers = ["reboot the router", "git reset soft head keeps changes", "git reset soft head",
               "git reset soft head keeps changes staged"]
    assert mbr_pick(answers) == 1 and mbr_pick(answers, "rouge_l") == 1
    assert mbr_pick(["same", "same"]) == 0 and mbr_pick(["only"]) == 0  # ties go to the earlier member


class Failing(dspy.Module):
    def forward(self, question):
        raise RuntimeError("member down")


def member(response: str | None, label: str) -> Member:
    """A CoT member answering through its own DummyLM (None: a member that fails)."""
    if response is None:
        return Member(Failing(), lm=DummyLM([]), adapter=dspy.ChatAdapter(), label=label)
    lm = DummyLM([{"reasoning": f"{label} thinks", "response": response}] * 3)
    return Member(dspy.ChainOfThought("question -> response"), lm=lm, adapter=dspy.ChatAdapter(), label=label)


def test_an_ensemble_keeps_the_consensus_answer_and_counts_members_that_failed():
    ensemble = Ensemble([member("reboot the router", "a"), member(None, "down"),
                         member("git reset --soft HEAD~1 keeps changes", "b"),
                         member("use git reset --soft HEAD~1 to keep changes", "c")])
    pred = ensemble(question="undo a commit?")
    assert pred.chosen in (2, 3) and pred.response.startswith(("git reset", "use git reset"))
    assert pred.reasoning == f"{'b' if pred.chosen == 2 else 'c'} thinks"  # the kept member's own reasoning
    assert pred.member_errors == 1 and pred.candidates[1] == "" and pred.candidates[0] == "reboot the router"
    assert len(ensemble.members[2].answer_lm.history) == 1  # each member asked its own LM once


def test_an_ensemble_whose_members_all_fail_raises():
    with pytest.raises(MembersFailed, match="none of the 2 members answered; first error: RuntimeError"):
        Ensemble([member(None, "x"), member(None, "y")])(question="q")


def test_a_selector_that_names_no_candidate_falls_back_to_the_consensus():
    ensemble = Ensemble([member("a b c d", "1"), member("a b c", "2"), member("x y z", "3")], reducer="select")
    with dspy.context(lm=DummyLM([{"reasoning": "r", "best": 9}])):
        pred = ensemble(question="q")
    assert pred.chosen in (0, 1)
    with dspy.context(lm=DummyLM([{"reasoning": "r", "best": 3}])):
        assert ensemble(question="q").chosen == 2


def test_samples_of_one_program_are_distinct_rollouts():
    lm = dspy.LM("openai/x", temperature=0.0)
    program = dspy.ChainOfThought("question -> response")
    samples = [Member(program, lm=lm, adapter=dspy.ChatAdapter(), label=f"s{i}", rollout=i, temperature=0.7)
               for i in (1, 2)]
    assert [m.sampling_lm.kwargs["rollout_id"] for m in samples] == [1, 2]
    assert {m.sampling_lm.kwargs["temperature"] for m in samples} == {0.7} and "rollout_id" not in lm.kwargs
    assert [n for n, _ in Ensemble(samples).named_predictors()] == ["members[0].program.predict"]  # one program
