"""Optimizers against a fake LM that behaves like a capable one: its judge passes answers (the embedded
135M model almost never lets a demo through), and it answers better with demos, so the optimizers that
bootstrap demos keep them. GEPA reflects on the judge's feedback through the same fake."""

import dspy
import mlflow
import pytest
from dspy.teleprompt.gepa.instruction_proposal import InstructionProposer
from mlflow.entities import LoggedModelStatus, SpanType

from pipelines.config import compose
from pipelines.data import load_splits
from pipelines.errors import ConfigError
from pipelines.evaluation.feedback import FeedbackF1
from pipelines.evaluation.judge import JudgedF1
from pipelines.lm import build_adapter, build_lm
from pipelines.optimizers import build_optimizer, compile_kwargs
from pipelines.programs import RAG
from pipelines.steps.optimize import run_optimize
from pipelines.tracking.models import load_program

from fake_lm import FakeLM, fake_model
from helpers import fake_lm_overrides, smoke


class WordRetriever:
    """Passages that share a word with the question; doc ids are positions."""

    passages = ["git reset --soft HEAD~1 undoes a commit", "ssh-keygen makes a key pair",
                "df -h shows free disk space"]

    def __call__(self, query, k=None):
        words = set(query.lower().split())
        ranked = sorted(range(len(self.passages)), key=lambda i: -len(words & set(self.passages[i].split())))
        return dspy.Prediction(passages=[self.passages[i] for i in ranked[:k]], doc_ids=ranked[:k])


def passing_lm(fake: FakeLM, adapter: str = "chat", *, score: float = 0.5,
               demo_score: float | None = None) -> list[str]:
    """A capable LM's behaviour: its judge passes answers, with `demo_score` for answers given with demos."""
    return fake_lm_overrides(fake.api_base, model=fake_model(score=score, demo_score=demo_score), adapter=adapter)


def rag_output_keys(demo) -> set[str]:
    return set(dict(demo)) - {"augmented"}


@pytest.mark.parametrize("optimizer", ["bootstrap", "mipro"])
def test_optimizers_bootstrap_demos_from_rag_traces(optimizer, fake):
    # Three candidates: MIPROv2's demo sets are zero-shot, labeled only, then bootstrapped ones.
    cfg = compose("optimize", ["experiment=smoke", *passing_lm(fake, score=0.7, demo_score=1.0),
                               "optimizer.num_candidates=3",
                               "optimizer.compile.num_trials=4"])
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
                program.deepcopy(), trainset=trainset, **compile_kwargs(cfg.optimizer))
        answer = optimized(question="how do I undo a commit?")
    candidates = [c["program"] for c in getattr(optimized, "candidate_programs", [])] or [optimized]
    bootstrapped = [d for c in candidates for d in c.respond.predict.demos if d.get("augmented")]
    assert bootstrapped, "no demo was bootstrapped"
    assert optimized.respond.predict.demos, "the optimizer should keep the demos that score higher"
    # A demo holds the predictor's own inputs and outputs, not the fields RAG adds to its result.
    assert rag_output_keys(bootstrapped[0]) == {"context", "question", "reasoning", "response"}
    assert answer.context and answer.doc_ids == [0, 1] and answer.response.startswith("fake response")


def test_optimized_rag_with_demos_logs_registers_and_loads_back(store, fake):
    embedder = ["embedder=openai", f"embedder.api_base={fake.api_base}", "embedder.api_key_env=null"]
    cfg = smoke("optimize", store, *passing_lm(fake, adapter="json_schema", score=0.7, demo_score=1.0), *embedder,
                "optimizer.num_candidates=3", "optimizer.compile.num_trials=4")
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


def test_gepa_shows_the_judges_feedback_to_the_reflection_lm(fake):
    cfg = compose("optimize", ["experiment=smoke", "optimizer=gepa_quick", *passing_lm(fake)])
    lm, adapter = build_lm(cfg.lm), build_adapter(cfg.lm)
    with dspy.context(lm=lm, adapter=adapter):
        optimizer = build_optimizer(cfg.optimizer, FeedbackF1(lm), reflection_lm=lm, track_stats=True,
                                    instruction_proposer=InstructionProposer(adapter=adapter))
        optimized = optimizer.compile(RAG(WordRetriever(), k=2), trainset=load_splits(cfg.data).train)
    reflections = [p for p in fake.prompts if "examples_with_feedback" in p]
    assert reflections, "GEPA never asked the reflection LM"
    for part in ("fake ground_truth_key_ideas", "fake system_response_key_ideas", "fake discussion",
                 "precision 0.50, recall 0.50"):
        assert part in reflections[0]
    # The proposed instruction was tried on the program; with equal scores the seed stays best.
    assert any("fake new_instruction" in p and "examples_with_feedback" not in p for p in fake.prompts)
    details = optimized.detailed_results
    assert details.total_metric_calls >= cfg.optimizer.max_metric_calls and details.best_idx == 0


def gepa_cfg(store, fake: FakeLM, *overrides: str):
    embedder = ["embedder=openai", f"embedder.api_base={fake.api_base}", "embedder.api_key_env=null"]
    return smoke("optimize", store, *passing_lm(fake, adapter="json_schema"), *embedder, "optimizer=gepa_quick",
                 *overrides)


def test_gepa_run_is_tracked_like_mipro_and_its_prompt_loads_from_the_registry(store, fake):
    cfg = gepa_cfg(store, fake)
    result = run_optimize(cfg)
    run = mlflow.get_run(result.run_id)
    client = mlflow.MlflowClient()
    best = client.get_metric_history(result.run_id, "gepa_best_val_score")
    calls = client.get_metric_history(result.run_id, "gepa_metric_calls")
    loaded = load_program(f"models:/{cfg.tracking.registered_model}@champion")
    assert run.info.status == "FINISHED" and run.data.tags["variant"] == "rag-gepa"
    assert [m.step for m in best][:2] == [0, 1] and best[0].value == pytest.approx(50.0)
    assert calls[-1].value >= cfg.optimizer.max_metric_calls and run.data.metrics["gepa_proposals"] >= 1
    assert run.data.metrics["gepa_unusable_proposals"] == 0
    artifacts = {a.path for d in ("eval", "program", "optimizer") for a in client.list_artifacts(result.run_id, d)}
    assert {"eval/dev_side_by_side.json", "program/program.json", "program/learned_prompt.md",
            "optimizer/gepa_candidates.json"} <= artifacts
    assert str(result.version) == "1"
    assert str(client.get_model_version_by_alias(cfg.tracking.registered_model, "champion").version) == "1"
    assert not hasattr(loaded, "detailed_results")  # GEPA's candidates are logged, not pickled
    name = f"{cfg.tracking.registered_model}.respond.predict"
    prompt = mlflow.genai.load_prompt(f"prompts:/{name}@champion")
    assert prompt.template[0]["content"] == loaded.respond.predict.signature.instructions
    assert prompt.tags["model_version"] == str(result.version) and prompt.tags["variant"] == "rag-gepa"


def test_unusable_reflections_are_counted_and_the_run_keeps_the_best_candidate(store, fake):
    reflection = f"optimizer.reflection_lm={{model:{fake_model('garbage')}}}"  # the same server, as a garbage LM
    result = run_optimize(gepa_cfg(store, fake, reflection))
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["gepa_unusable_proposals"] >= 1
    assert run.data.metrics["gepa_proposals"] == 0 and run.data.metrics["gepa_candidates"] == 0
    assert "reflection_prompt_tokens" in run.data.metrics


@pytest.mark.parametrize("override, message", [
    ("optimizer.max_metric_calls=7", "too few for one reflection round: it needs 11"),
    ("optimizer.reflection_lm=openai/gpt-4o", "optimizer.reflection_lm must be null or keys laid over lm"),
    ("+optimizer.reflection_lm.api_key_env=RAGQA_TEST_MISSING_KEY", "needs the environment variable"),
    ("optimizer.auto=light", "Exactly one of max_metric_calls, max_full_evals, auto must be set"),
])
def test_bad_gepa_config_fails_in_one_line_before_any_run(store, monkeypatch, override, message, fake):
    monkeypatch.delenv("RAGQA_TEST_MISSING_KEY", raising=False)
    with pytest.raises(ConfigError, match=message) as error:
        run_optimize(gepa_cfg(store, fake, override))
    assert fake.calls == 0  # nothing was scored either
    assert "\n" not in str(error.value)
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_main_compiles_with_mipro_and_gepa_side_by_side(store, fake):
    from pipelines.steps.pipeline import run_pipeline

    overrides = ["experiment=smoke", f"tracking.artifact_location={store}/artifacts",
                 *passing_lm(fake, adapter="json_schema"), "embedder=openai", f"embedder.api_base={fake.api_base}",
                 "embedder.api_key_env=null"]
    result = run_pipeline(compose("main", [*overrides, "steps=[optimize,gepa]"]), overrides)
    parent = mlflow.get_run(result.run_id)
    children = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'")
    assert sorted(c.data.tags["variant"] for c in children) == ["rag-gepa", "rag-mipro"]
    assert {"optimize_semantic_f1", "gepa_semantic_f1"} <= set(parent.data.metrics)
    table = mlflow.load_table("comparison.json", run_ids=[result.run_id])
    assert list(table["variant"]) == ["optimize", "gepa", "gepa - optimize"]  # the variants, then the pair
