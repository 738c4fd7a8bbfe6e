"""The real embedded LM under the schema-constrained adapter: its outputs parse, as a program's, as the
SemanticF1 judge's, and as multihop's query writer's."""

import dspy

from pipelines.config import compose
from pipelines.data import load_splits
from pipelines.evaluation.judge import JudgedF1
from pipelines.lm import build_adapter, build_lm


def test_constrained_local_lm_parses_cot_and_semantic_f1_on_two_examples(local_server):
    cfg = compose("cot", ["lm.cache=false"])
    lm, adapter = build_lm(cfg.lm), build_adapter(cfg.lm)
    examples = load_splits(cfg.data).dev[:2]
    metric = JudgedF1(lm)
    with dspy.context(lm=lm, adapter=adapter):
        for example in examples:
            pred = dspy.ChainOfThought("question -> response")(question=example.question)
            assert isinstance(pred.response, str) and pred.response.strip()
            assert isinstance(pred.reasoning, str)
            assert 0.0 <= metric(example, pred).score <= 1.0
    assert metric.failures == 0
    assert lm.kwargs["api_base"] == local_server
    sent = lm.history[-1]["kwargs"]["response_format"]
    assert sent["type"] == "json_object" and "recall" in sent["schema"]["properties"]


def test_the_embedded_lm_writes_multihops_second_query(local_server, store):
    from pipelines.programs import build_program
    from pipelines.steps.session import build_retriever

    cfg = compose("multihop", ["lm.cache=false"])
    lm, adapter = build_lm(cfg.lm), build_adapter(cfg.lm)
    program = build_program(cfg.program, cfg.lm, build_retriever(cfg)[0])
    example = load_splits(cfg.data).dev[0]
    with dspy.context(lm=lm, adapter=adapter):
        pred = program(question=example.question)
    first, written = pred.queries
    assert first == example.question and isinstance(written, str) and written.strip()
    assert len(pred.hop_doc_ids) == 2 and pred.response.strip()
    assert pred.doc_ids == list(dict.fromkeys(pred.hop_doc_ids[0] + pred.hop_doc_ids[1]))
