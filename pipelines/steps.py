"""What each entry point does, as importable functions: wire config to components and log one run."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dspy
import mlflow

from pipelines import tracking
from pipelines.data import Splits, examples_hash, load_corpus, load_splits
from pipelines.lm import (LMServerError, build_adapter, build_lm, check_credentials, ensure_reachable, healthy,
                          merged_judge_cfg)
from pipelines.programs import build_program
from pipelines.retrieval import Retriever, build_embedder, load_or_build_index
from pipelines.scoring import EvalResult, JudgedF1, evaluate

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    name: str
    run_id: str
    score: float
    model_uri: str | None = None
    version: str | None = None


@dataclass
class Session:
    """Everything built from config before a run opens, so bad input fails with no run left behind."""

    cfg: Any
    lm: dspy.LM
    judge: dspy.LM
    adapter: dspy.Adapter
    metric: JudgedF1
    splits: Splits


def prepare(cfg) -> Session:
    check_credentials(cfg.lm)
    judge_cfg = merged_judge_cfg(cfg)
    check_credentials(judge_cfg)
    splits = load_splits(cfg.data)
    lm = build_lm(cfg.lm)
    judge = lm if judge_cfg is cfg.lm else build_lm(judge_cfg)
    adapter = build_adapter(cfg.lm)
    for model in (lm, judge):
        ensure_reachable(model)
    # LM responses are cached next to the project's other caches (RAGQA_CACHE_DIR), not in ~/.dspy_cache.
    dspy.configure_cache(disk_cache_dir=str(Path(cfg.paths.cache) / "dspy"))
    dspy.configure(lm=lm, adapter=adapter)
    tracking.setup(cfg)
    return Session(cfg, lm, judge, adapter, JudgedF1(judge, traced=bool(cfg.tracking.trace_judge)), splits)


def build_retriever(cfg) -> tuple[Retriever, dict[str, Any]]:
    corpus = load_corpus(cfg.data)
    embedder = build_embedder(cfg.embedder)
    built = load_or_build_index(corpus, embedder, cfg.embedder, cfg.program.get("max_characters"),
                                Path(cfg.paths.cache) / "index",
                                brute_force_threshold=int(cfg.program.brute_force_threshold))
    info = {"path": built.path, "cache_hit": built.cache_hit, "embedded": built.embedded,
            "passages": len(built.index.passages), "has_doc_ids": corpus.has_doc_ids}
    return Retriever(built.index, embedder, k=int(cfg.program.k)), info


def _score(session: Session, program, examples, prefix: str, split: str) -> EvalResult:
    """Evaluate, log table and metrics, then fail loudly if the LM server died underneath us."""
    tracing = session.cfg.tracking
    traces_per_example = (1 + bool(tracing.trace_judge)) if tracing.log_traces else 0
    with tracking.watch_traces(len(examples) * traces_per_example, prefix):
        result = evaluate(program, examples, session.metric, int(session.cfg.num_threads))
    tracking.log_evaluation(result, split, prefix=prefix)
    base = session.lm.kwargs.get("api_base")
    if result.failed and base and not healthy(base):
        raise LMServerError(f"the LM server at {base} stopped answering during evaluation; "
                            f"{result.failed} of {result.num_examples} examples failed (table logged)")
    return result


def _log_and_register(session: Session, program, score: float, variant: str) -> tuple[str, str | None]:
    info = tracking.log_program(program, session.lm, session.adapter)
    version = None
    if session.cfg.tracking.get("registered_model"):
        version = tracking.register(info.model_uri, session.cfg.tracking.registered_model, score,
                                    examples_hash(session.splits.dev), variant)["version"]
    return info.model_uri, version


def _usage_marks(session: Session) -> dict[int, int]:
    return {id(lm): len(lm.history) for lm in {session.lm, session.judge}}


def _log_usage(session: Session, marks: dict[int, int]) -> None:
    lms = {id(session.lm): session.lm, id(session.judge): session.judge}
    for key, lm in lms.items():
        tracking.log_usage(lm, since=marks[key], prefix="" if lm is session.lm else "judge_")


def run_variant(cfg) -> StepResult:
    """`cot` or `rag`: evaluate the unoptimized program on dev, log it and register it."""
    session = prepare(cfg)
    variant = cfg.program.name
    retriever, index_info = build_retriever(cfg) if variant == "rag" else (None, None)
    with tracking.run(variant, cfg, tags={"variant": variant}) as active:
        tracking.log_datasets({"train": session.splits.train, "dev": session.splits.dev},
                              source=str(cfg.data.examples), name=cfg.data.name)
        if index_info:
            tracking.log_index(index_info["path"], index_info)
        program = build_program(cfg.program, cfg.lm, retriever)
        marks = _usage_marks(session)
        result = _score(session, program, session.splits.dev, "", "dev")
        _log_usage(session, marks)
        model_uri, version = _log_and_register(session, program, result.score, variant)
        return StepResult(variant, active.info.run_id, result.score, model_uri, version)


def build_optimizer(opt, metric) -> dspy.MIPROv2:
    return dspy.MIPROv2(metric=metric, auto=opt.auto, num_candidates=opt.num_candidates,
                        num_threads=int(opt.num_threads), max_bootstrapped_demos=int(opt.max_bootstrapped_demos),
                        max_labeled_demos=int(opt.max_labeled_demos), seed=int(opt.seed),
                        init_temperature=float(opt.init_temperature))


def run_optimize(cfg) -> StepResult:
    """Compile RAG with MIPROv2 on train; score baseline and optimized on dev; log, register, promote."""
    session = prepare(cfg)
    retriever, index_info = build_retriever(cfg)
    opt = cfg.optimizer
    with tracking.run("optimize", cfg, tags={"variant": "rag_mipro"}) as active:
        tracking.log_datasets({"train": session.splits.train, "dev": session.splits.dev},
                              source=str(cfg.data.examples), name=cfg.data.name)
        tracking.log_index(index_info["path"], index_info)
        baseline = build_program(cfg.program, cfg.lm, retriever)
        marks = _usage_marks(session)
        base = _score(session, baseline, session.splits.dev, "baseline_", "dev")
        optimizer = build_optimizer(opt, session.metric)
        compile_kwargs = {"num_trials": opt.num_trials} if opt.num_trials else {}
        # MIPROv2 holds out 80% of train as its valset and refuses a larger minibatch.
        valset_size = max(1, int(len(session.splits.train) * 0.8))
        minibatch = bool(opt.minibatch) and int(opt.minibatch_size) < valset_size
        optimized = optimizer.compile(baseline.deepcopy(), trainset=session.splits.train, minibatch=minibatch,
                                      minibatch_size=int(opt.minibatch_size), **compile_kwargs)
        best = _score(session, optimized, session.splits.dev, "", "dev")
        mlflow.log_metric("semantic_f1_delta", best.score - base.score)
        tracking.log_table(side_by_side(base, best), "eval/dev_side_by_side.json")
        tracking.log_program_json(optimized)
        mlflow.log_text(describe_program(optimized), "program/learned_prompt.md")
        _log_usage(session, marks)
        model_uri, version = _log_and_register(session, optimized, best.score, "rag_mipro")
        return StepResult("optimize", active.info.run_id, best.score, model_uri, version)


def run_evaluate(cfg) -> StepResult:
    """Score any logged or registered program (`model_uri`) on a chosen split, in a new run."""
    if not cfg.get("model_uri"):
        raise ValueError("evaluate needs model_uri=... (e.g. models:/NAME@champion or runs:/RUN_ID/program)")
    session = prepare(cfg)
    program = load_program(cfg.model_uri)
    split = cfg.split
    with tracking.run(f"evaluate-{split}", cfg, tags={"model_uri": cfg.model_uri}) as active:
        mlflow.log_param("model_uri", cfg.model_uri)
        tracking.log_datasets({split: session.splits.get(split)}, source=str(cfg.data.examples), name=cfg.data.name)
        marks = _usage_marks(session)
        result = _score(session, program, session.splits.get(split), "", split)
        mlflow.log_metric(f"{split}_semantic_f1", result.score)
        _log_usage(session, marks)
        tracking.tag_version_score(cfg.model_uri, f"{split}_semantic_f1", result.score)
        return StepResult(f"evaluate-{split}", active.info.run_id, result.score, cfg.model_uri)


def load_program(model_uri: str) -> dspy.Module:
    """Load a logged program. Our own models are pickles that we wrote, so pickle loading is allowed."""
    import os

    os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    try:
        return mlflow.dspy.load_model(model_uri)
    except (ModuleNotFoundError, AttributeError, ImportError) as e:
        raise RuntimeError(f"{model_uri} was logged by an incompatible version of this project "
                           f"({type(e).__name__}: {e}); re-run the step that logged it") from None


def side_by_side(base: EvalResult, best: EvalResult) -> list[dict]:
    return [{"question": b["question"], "gold": b["gold"], "baseline_answer": b["prediction"],
             "baseline_score": b["score"], "optimized_answer": o["prediction"], "optimized_score": o["score"],
             "delta": o["score"] - b["score"]} for b, o in zip(base.rows, best.rows)]


def describe_program(program: dspy.Module) -> str:
    """Readable instructions and demos of every predictor."""
    parts = []
    for name, predictor in program.named_predictors():
        parts.append(f"## {name}\n\n### Instructions\n\n{predictor.signature.instructions}\n")
        for i, demo in enumerate(predictor.demos, start=1):
            parts.append(f"### Demo {i}\n\n```json\n{json.dumps(dict(demo), indent=2, default=str)}\n```\n")
    return "\n".join(parts)


STEP_FUNCTIONS = {"cot": run_variant, "rag": run_variant, "optimize": run_optimize}


def run_pipeline(cfg, overrides=()) -> StepResult:
    """One parent run; each step composed from its own config with the same overrides, as a child."""
    from pipelines.config import compose

    unknown = [s for s in cfg.steps if s not in STEP_FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown steps {unknown}; choose from {sorted(STEP_FUNCTIONS)}")
    prepare(cfg)  # fail on bad input before the parent run opens
    results = []
    with tracking.run("main", cfg) as parent:
        for step in cfg.steps:
            results.append(STEP_FUNCTIONS[step](compose(step, overrides)))
        rows = [{"variant": r.name, "semantic_f1": r.score, "run_id": r.run_id, "model_uri": r.model_uri,
                 "registered_version": r.version} for r in results]
        tracking.log_table(rows, "comparison.json")
        mlflow.log_metrics({f"{r.name}_semantic_f1": r.score for r in results})
        tracking.log_figure(comparison_chart(rows), "comparison.png")
        best = max(results, key=lambda r: r.score)
        mlflow.set_tag("best_variant", best.name)
        return StepResult("main", parent.info.run_id, best.score, best.model_uri, best.version)


def comparison_chart(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    names = [r["variant"] for r in rows]
    scores = [r["semantic_f1"] for r in rows]
    bars = ax.bar(names, scores, color=["#9aa5b1", "#5b8def", "#2f6f4f"][: len(rows)])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel("SemanticF1 (dev)")
    ax.set_ylim(0, 100)
    ax.set_title("CoT -> RAG -> RAG + MIPROv2")
    fig.tight_layout()
    return fig
