"""Optimizers that bootstrap demos from traces, against a fake LM that behaves like a capable one: its
judge passes answers (the embedded 135M model almost never lets a demo through), and it answers
better with demos, so the optimizers keep them."""

import dspy
import mlflow
import pytest
from helpers import fake_lm_overrides, smoke
from mlflow.entities import LoggedModelStatus, SpanType

from pipelines.config import compose
from pipelines.data import load_splits
from pipelines.lm import build_adapter, build_lm
from pipelines.programs import RAG
from pipelines.scoring import JudgedF1
from pipelines.steps import build_optimizer, run_optimize
from pipelines.tracking import load_program

from fake_lm import FakeLM


class WordRetriever:
    """Passages that share a word with the question; doc ids are positions."""

    passages = ["git reset --soft HEAD~1 undoes a commit", "ssh-keygen makes a key pair",
                "df -h shows free disk space"]

    def __call__(self, query, k=None):
        words = set(query.lower().split())
        ranked = sorted(range(len(self.passages)), key=lambda i: -len(words & set(self.passages[i].split())))
        return dspy.Prediction(passages=[self.passages[i] for i in ranked[:k]], doc_ids=ranked[:k])


def passing_lm(fake: FakeLM, adapter: str = "chat") -> list[str]:
    return fake_lm_overrides(fake.api_base, model="openai/fake-capable", adapter=adapter)


def rag_output_keys(demo) -> set[str]:
    return set(dict(demo)) - {"augmented"}


@pytest.mark.parametrize("optimizer", ["bootstrap", "mipro"])
def test_optimizers_bootstrap_demos_from_rag_traces(optimizer):
    with FakeLM(score=0.7, demo_score=1.0) as fake:
        # Three candidates: MIPROv2's demo sets are zero-shot, labeled only, then bootstrapped ones.
        cfg = compose("optimize", ["experiment=smoke", *passing_lm(fake), "optimizer.num_candidates=3",
                                   "optimizer.num_trials=4"])
        lm, adapter = build_lm(cfg.lm), build_adapter(cfg.lm)
        trainset = load_splits(cfg.data).train
        metric = JudgedF1(lm)
        program = RAG(WordRetriever(), k=2)
        with dspy.context(lm=lm, adapter=adapter):
            if optimizer == "bootstrap":
                teleprompter = dspy.BootstrapFewShot(metric=metric, max_bootstrapped_demos=2, max_labeled_demos=0)
                optimized = teleprompter.compile(program, trainset=trainset)
            else:
                optimized = build_optimizer(cfg.optimizer, metric).compile(
                    program.deepcopy(), trainset=trainset, minibatch=False, num_trials=cfg.optimizer.num_trials)
            answer = optimized(question="how do I undo a commit?")
    candidates = [c["program"] for c in getattr(optimized, "candidate_programs", [])] or [optimized]
    bootstrapped = [d for c in candidates for d in c.respond.predict.demos if d.get("augmented")]
    assert bootstrapped, "no demo was bootstrapped"
    assert optimized.respond.predict.demos, "the optimizer should keep the demos that score higher"
    # A demo holds the predictor's own inputs and outputs, not the fields RAG adds to its result.
    assert rag_output_keys(bootstrapped[0]) == {"context", "question", "reasoning", "response"}
    assert answer.context and answer.doc_ids == [0, 1] and answer.response.startswith("fake response")


def test_optimized_rag_with_demos_logs_registers_and_loads_back(store):
    with FakeLM(score=0.7, demo_score=1.0) as fake:
        embedder = ["embedder=openai", f"embedder.api_base={fake.api_base}", "embedder.api_key_env=null"]
        cfg = smoke("optimize", store, *passing_lm(fake, adapter="json_schema"), *embedder,
                    "optimizer.num_candidates=3", "optimizer.num_trials=4")
        result = run_optimize(cfg)
        assert fake.embedding_calls > 0
        run = mlflow.get_run(result.run_id)
        assert run.info.status == "FINISHED" and run.data.metrics["semantic_f1"] == 100.0
        assert run.info.run_name == "optimize"
        check_models_and_traces(run)
        loaded = load_program(f"models:/{cfg.tracking.registered_model}/{result.version}")
        demos = loaded.respond.predict.demos
        assert any(d.get("augmented") for d in demos), demos
        with dspy.context(lm=build_lm(cfg.lm), adapter=build_adapter(cfg.lm)):
            answer = loaded(question="how do I undo my last git commit?")
    assert answer.response and len(answer.doc_ids) == cfg.program.k


def check_models_and_traces(run):
    """What the MLflow UI shows for an optimize run: one model per program, traces linked and tagged,
    retrieval visible as a RETRIEVER span with its passages as documents."""
    client = mlflow.MlflowClient()
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    assert sorted(m.name for m in models) == ["rag", "rag-mipro"]
    assert all(m.status.to_int() == LoggedModelStatus.READY.to_int() for m in models), [m.status for m in models]
    by_id = {m.model_id: m.name for m in models}
    traces = mlflow.search_traces(run_id=run.info.run_id, return_type="list")
    assert len(traces) == 2 * int(run.data.metrics["num_examples"])
    phases = {}
    for trace in traces:
        model_name = by_id[trace.info.trace_metadata["mlflow.modelId"]]
        phases.setdefault(trace.info.tags["phase"], set()).add((model_name, trace.info.tags["variant"]))
        (retrieval,) = [s for s in trace.data.spans if s.span_type == SpanType.RETRIEVER]
        documents = retrieval.outputs
        assert len(documents) == 5 and all(d["page_content"] and "doc_id" in d["metadata"] for d in documents)
    assert phases == {"baseline": {("rag", "rag")}, "optimized": {("rag-mipro", "rag-mipro")}}
