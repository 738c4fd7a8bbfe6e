"""What each entry point does, as importable functions: wire config to components and log one run."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dspy
from dspy.teleprompt.gepa.instruction_proposal import InstructionProposer
from hydra.utils import get_class

from pipelines import members, packaging, tracking
from pipelines.config import ConfigError
from pipelines.data import Splits, examples_hash, load_corpus, load_splits
from pipelines.evaluation.feedback import FeedbackF1
from pipelines.evaluation.judge import JudgedF1
from pipelines.evaluation.metrics import label
from pipelines.evaluation.promotion import shortfall
from pipelines.evaluation.report import (
    comparison_chart,
    comparison_row,
    describe_program,
    failure_chart,
    quality_cost_chart,
    quality_cost_rows,
    side_by_side,
)
from pipelines.evaluation.result import EvalResult, compare
from pipelines.evaluation.scoring import Scorer, Scoring, evaluate
from pipelines.evaluation.stats import Comparison, Estimate
from pipelines.judging import agreement, align, labels
from pipelines.lm import (
    build_adapter,
    build_lm,
    check_credentials,
    ensure_reachable,
    merged_judge_cfg,
    merged_reflection_cfg,
    merged_teacher_cfg,
)
from pipelines.optimizers import (
    AtLeast,
    Compiling,
    build_optimizer,
    check_optimizer,
    compile_kwargs,
    finetune_provider,
    gepa_candidates,
    kept_candidates,
    nested,
    ranked_candidates,
    reflective,
    teaching,
)
from pipelines.programs import Ensemble, build_program, check_program, doc_id_type, program_lm
from pipelines.retrieval import Retriever, build_embedder, load_or_build_index
from pipelines.scale import batch, engine, spark
from pipelines.scale.batch import Predictions
from pipelines.schema import Engine, ProgramName
from pipelines.server import LMServerError, healthy
from pipelines.tracking import scorers
from pipelines.tracking.judging.registry import aligned_state

if TYPE_CHECKING:
    from mlflow import ActiveRun
    from mlflow.data.pandas_dataset import PandasDataset
    from mlflow.entities import LoggedModel

    from pipelines.schema import Config

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    name: str
    run_id: str
    result: EvalResult  # the step's final evaluation: estimates and per-example rows
    model_uri: str | None = None
    version: str | None = None

    @property
    def score(self) -> float:
        return self.result.score

    def headline(self) -> str:
        return self.result.headline()


@dataclass(frozen=True, kw_only=True)
class PredictResult:
    run_id: str
    predictions: Predictions
    output: Path
    score = None  # nothing to score: Hydra sweeps compare predict jobs by nothing

    def headline(self) -> str:
        p = self.predictions
        return f"{p.rows} rows, {p.failed} failed, {p.rows / max(p.seconds, 1e-9):.1f} rows/s -> {self.output}"


@dataclass
class Session:
    """Everything built from config before a run opens, so bad input fails with no run left behind."""

    cfg: Config
    lm: dspy.LM
    judge: dspy.LM
    adapter: dspy.Adapter
    scorer: Scorer
    splits: Splits
    ensemble: Ensemble | None = None  # program=ensemble: its members, loaded before any LM starts

    @property
    def scoring(self) -> Scoring:
        return self.scorer.scoring


@dataclass(frozen=True)
class Checked:
    """What checking a step's config reads on the way: its scoring (judge resolved) and its data."""

    scoring: Scoring
    splits: Splits


def check_step(cfg: Config, *, model_uri: str | None = None, optimizing: bool = False) -> Checked:
    """Everything about a step's config that can be wrong, checked with no LM built or called and no run
    opened, cheapest first: the program's numbers, a tracking server that is down or refuses us, a judge
    or `model_uri` that names nothing, a missing key, the data, and (`optimizing`) the optimizer's config.
    An ensemble's members are checked where they are loaded (`members.build`), or by `main` before its
    optimize step has made them."""
    scoring = Scoring.from_cfg(cfg.scoring)
    check_program(cfg.program)
    tracking.setup(cfg)
    scoring = resolved_judge(scoring)
    if model_uri:
        tracking.check_model(model_uri)
    check_credentials(cfg.lm)
    check_credentials(merged_judge_cfg(cfg))
    splits = load_splits(cfg.data)
    if optimizing:
        check_optimizer(cfg, len(splits.train))
    return Checked(scoring, splits)


def prepare(cfg: Config, *, model_uri: str | None = None, optimizing: bool = False) -> Session:
    """Check (`check_step`) and build everything a step needs: an ensemble's members are loaded, then the
    LMs are built and reached (the embedded server starts here), still before any run opens."""
    checked = check_step(cfg, model_uri=model_uri, optimizing=optimizing)
    scoring, splits = checked.scoring, checked.splits
    ensemble = members.build(cfg.ensemble) if cfg.program.name == ProgramName.ensemble else None
    judge_cfg = merged_judge_cfg(cfg)
    lm = build_lm(cfg.lm)
    judge = lm if judge_cfg is cfg.lm else build_lm(judge_cfg)
    adapter = build_adapter(cfg.lm)
    for model in (lm, judge):
        ensure_reachable(model)
    # LM responses are cached next to the project's other caches (RAGQA_CACHE_DIR), not in ~/.dspy_cache.
    dspy.configure_cache(disk_cache_dir=str(Path(cfg.paths.cache) / "dspy"))
    dspy.configure(lm=lm, adapter=adapter)
    scorer = Scorer.with_judges(scoring, judge, traced=cfg.tracking.trace_judge)
    return Session(cfg, lm, judge, adapter, scorer, splits, ensemble)


def build_retriever(cfg: Config) -> tuple[Retriever, dict[str, Any]]:
    started = time.monotonic()
    corpus = load_corpus(cfg.data)
    embedder = build_embedder(cfg.embedder)

    def on_spark(texts: list[str]):  # started only when the index is not cached
        return engine.embed_on_spark(spark.session(cfg), texts, packaging.embedder_spec(embedder),
                                     partitions=cfg.spark.partitions)

    built = load_or_build_index(corpus, embedder, cfg.embedder, cfg.program.max_characters,
                                Path(cfg.paths.cache) / "index",
                                brute_force_threshold=cfg.program.brute_force_threshold,
                                embed=on_spark if cfg.index.engine == Engine.spark else None)
    info = {"path": built.path, "cache_hit": built.cache_hit, "embedded": built.embedded,
            "passages": len(built.index.passages), "has_doc_ids": corpus.has_doc_ids,
            "seconds": time.monotonic() - started}
    return Retriever(built.index, embedder, k=cfg.program.k), info


def _score(session: Session, program: dspy.Module, examples: list[dspy.Example], *, step: str, split: str,
           model: LoggedModel | None, dataset: PandasDataset | None = None, prefix: str = "",
           **trace_tags: str) -> EvalResult:
    """Evaluate `program` (the LoggedModel `model`) on `examples` in `step`'s run: traces linked to the
    model and tagged; metrics, table and assessments logged; then fail loudly if the LM server died
    underneath us."""
    cfg, tracing = session.cfg, session.cfg.tracking
    on_spark = cfg.engine == Engine.spark
    where = tracking.evaluation_tracing(model, split=split, **trace_tags) if on_spark and tracing.log_traces else None
    traced = tracing.log_traces and (where is not None or not on_spark)
    # Executors do not trace the judge: one trace per example there.
    traces_per_example = (1 + bool(tracing.trace_judge and not on_spark)) if traced else 0
    with tracking.watch_traces(len(examples) * traces_per_example, prefix), tracking.timed(f"{prefix}evaluate"), \
            tracking.held():  # traces wait here for their assessments, then are written with them
        with tracking.evaluating(model, split=split, **trace_tags):
            if on_spark:  # the program answers through whatever LM and adapter DSPy is configured with, as here
                result = engine.evaluate_on_spark(spark.session(cfg), program, examples, session.scorer,
                                                  lm=dspy.settings.lm, adapter=dspy.settings.adapter,
                                                  num_threads=cfg.num_threads, partitions=cfg.spark.partitions,
                                                  cache_dir=str(Path(cfg.paths.cache) / "dspy"), tracing=where)
            else:
                result = evaluate(program, examples, session.scorer, num_threads=cfg.num_threads,
                                  trace_id=tracking.last_trace_id if tracing.log_traces else None)
        tracking.log_evaluation(result, split=split, prefix=prefix, model=model, dataset=dataset)
    log.info("%s %s%s: %s", step, prefix, split, result.summary())
    base = session.lm.kwargs.get("api_base")
    if result.failed and base and not healthy(base):
        raise LMServerError(f"the LM server at {base} stopped answering during evaluation; "
                            f"{result.failed} of {result.num_examples} examples failed (table logged)")
    return result


def _log_and_register(session: Session, program: dspy.Module, result: EvalResult, *, variant: str,
                      model: LoggedModel, tags: dict[str, str] | None = None) -> tuple[str, str | None]:
    """Log the program into `model`, answering through its predictors' own LM (a finetuned one) or the
    session's; register it, and its predictors' prompts, whose `champion` alias follows the program's.
    `tags` (its teacher, its adapter) go on the registered version too."""
    registered = session.cfg.tracking.registered_model
    prompts = tracking.register_prompts(program, registered_model=registered, variant=variant) if registered else []
    signature = tracking.program_signature(program, doc_id_type=doc_id_type(program),
                                           num_threads=session.cfg.num_threads)
    with tracking.timed("log_model"):
        info = tracking.log_program(program, lm=program_lm(program) or session.lm, adapter=session.adapter, model=model,
                                    signature=signature, dspy_flavor=session.cfg.tracking.dspy_flavor, prompts=prompts)
    if not registered:
        return info.model_uri, None
    with tracking.timed("register"):
        registration = tracking.register(info.model_uri, registered_model=registered, model_id=model.model_id,
                                         result=result, dev_set=examples_hash(session.splits.dev), variant=variant,
                                         scoring=session.scoring, tags=tags)
    tracking.link_prompts(prompts, registered_model=registered, version=registration.version,
                          promoted=registration.promoted)
    return info.model_uri, registration.version


@contextlib.contextmanager
def _step_run(session: Session, name: str, *, variant: str, index_info: dict[str, Any] | None,
              tags: dict[str, str] | None = None) -> Iterator[tuple[ActiveRun, dict[str, PandasDataset]]]:
    """A step's run with what every training step logs first: the train/dev datasets and the index."""
    with tracking.run(name, session.cfg, tags={"variant": variant, **(tags or {})}) as active:
        datasets = tracking.log_datasets({"train": session.splits.train, "dev": session.splits.dev},
                                         session.cfg.data)
        if index_info:
            tracking.log_index(index_info["path"], index_info)
        yield active, datasets


RETRIEVING = (ProgramName.rag, ProgramName.multihop)


def run_variant(cfg: Config, *, name: str | None = None) -> StepResult:
    """`cot`, `rag`, `multihop` or `ensemble`: evaluate the program as configured (not compiled) on dev, log
    it and register it. `name` names the run and variant (default: the program's name)."""
    session = prepare(cfg)
    variant = name or str(cfg.program.name)
    retriever, index_info = build_retriever(cfg) if cfg.program.name in RETRIEVING else (None, None)
    with _step_run(session, variant, variant=variant, index_info=index_info) as (active, datasets):
        program = session.ensemble or build_program(cfg.program, cfg.lm, retriever)
        if session.ensemble:
            tracking.log_ensemble(session.ensemble)
        model = tracking.new_model(variant, variant=variant)
        with tracking.usage(session.lm, judge=session.judge):
            result = _score(session, program, session.splits.dev, step=variant, split="dev", model=model,
                            dataset=datasets["dev"], variant=variant)
        model_uri, version = _log_and_register(session, program, result, variant=variant, model=model)
        return StepResult(variant, active.info.run_id, result, model_uri, version)


def session_optimizer(session: Session) -> Compiling:
    """The configured optimizer with what it needs at run time: GEPA gets SemanticF1 with feedback and a
    reflection LM, a teacher is built and reached, BootstrapFinetune gets its finetuning provider and keeps
    the traces that pass `optimizer.finetune.min_score`. The session was prepared with `optimizing=True`,
    so its optimizer config was checked (`check_optimizer`) before any LM started."""
    cfg = session.cfg
    teacher_cfg, teaching_mode = merged_teacher_cfg(cfg), teaching(cfg.optimizer)
    teacher_lm = teacher_adapter = None
    if teacher_cfg is not None:
        teacher_lm, teacher_adapter = build_lm(teacher_cfg), build_adapter(teacher_cfg)
        ensure_reachable(teacher_lm)
    runtime: dict[str, Any] = {}
    if teacher_lm is not None and teaching_mode == "settings":
        # The teacher answers through its own config's adapter; the demos it leaves are field values.
        runtime["teacher_settings"] = {"lm": teacher_lm, "adapter": teacher_adapter}
    if cfg.optimizer.get("finetune"):
        provider = finetune_provider(cfg.optimizer, cfg.lm, Path(cfg.paths.cache) / "adapters")
        passing = AtLeast(session.scorer, float(cfg.optimizer.finetune.get("min_score") or 0.0))

        def weights_or_prompts(opt_cfg) -> dspy.teleprompt.Teleprompter:
            """BootstrapFinetune keeps the traces that pass; a prompt optimizer is scored as usual."""
            if get_class(opt_cfg._target_) is dspy.BootstrapFinetune:
                return build_optimizer(opt_cfg, passing, adapter=session.adapter)
            return build_optimizer(opt_cfg, session.scorer, **runtime)

        steps = nested(cfg.optimizer)
        if steps:  # BetterTogether: its `p` and `w` optimizers, each built with its own metric
            built = {key: weights_or_prompts(sub) for key, sub in steps.items()}
            optimizer = build_optimizer(cfg.optimizer, session.scorer, **built)
        else:
            optimizer = weights_or_prompts(cfg.optimizer)
        return Compiling(optimizer, teacher_lm=teacher_lm, teacher_adapter=teacher_adapter, teaching=teaching_mode,
                         provider=provider)
    if not reflective(cfg.optimizer):
        return Compiling(build_optimizer(cfg.optimizer, session.scorer, **runtime), teacher_lm=teacher_lm,
                         teaching=teaching_mode)
    reflection_cfg = merged_reflection_cfg(cfg)
    reflection_lm = session.lm if reflection_cfg is cfg.lm else build_lm(reflection_cfg)
    ensure_reachable(reflection_lm)
    # The reflection LM answers through its own config's adapter: schema-constrained for the embedded LM.
    proposer = InstructionProposer(adapter=build_adapter(reflection_cfg))
    optimizer = build_optimizer(cfg.optimizer, FeedbackF1(session.judge, traced=cfg.tracking.trace_judge),
                                reflection_lm=reflection_lm, instruction_proposer=proposer, track_stats=True,
                                gepa_kwargs={"callbacks": [tracking.GEPAProgress()]})
    return Compiling(optimizer, reflection_lm=reflection_lm)


def run_optimize(cfg: Config) -> StepResult:
    """Compile the program (rag, multihop or cot) on train with the configured optimizer, every predictor of
    it; score baseline and optimized on dev; keep the best scored candidates; log, register, promote. Every
    optimizer takes this same path; the `variant` tag names both (rag-mipro, multihop-gepa)."""
    session = prepare(cfg, optimizing=True)
    compiling = session_optimizer(session)
    retriever, index_info = build_retriever(cfg) if cfg.program.name in RETRIEVING else (None, None)
    baseline_variant = str(cfg.program.name)
    variant = f"{baseline_variant}-{cfg.optimizer.name}"  # rag-mipro, multihop-gepa: also the model's name
    lineage = {"teacher": compiling.teacher_lm.model} if compiling.teacher_lm is not None else {}
    with _step_run(session, "optimize", variant=variant, index_info=index_info, tags=lineage) as (active, datasets), \
            tracking.usage(session.lm, judge=session.judge, reflection=compiling.reflection_lm,
                           teacher=compiling.teacher_lm):
        baseline = build_program(cfg.program, cfg.lm, retriever)
        base = _score(session, baseline, session.splits.dev, step="optimize", split="dev", prefix="baseline_",
                      model=tracking.new_model(baseline_variant, variant=baseline_variant, external=True),
                      dataset=datasets["dev"], variant=baseline_variant, phase="baseline")
        if compiling.provider is not None:
            compiling.provider.on_step = tracking.step_metric("finetune_loss")
        with tracking.timed("compile"):
            optimized = compiling.compile(baseline.deepcopy(), trainset=session.splits.train,
                                          **compile_kwargs(cfg.optimizer))
        answering = program_lm(optimized)  # the LM its predictors carry (finetuning sets one), else None
        if compiling.provider is not None:
            trained = tracking.log_finetune(compiling.provider)
            if answering is not None and answering.model == trained.get("finetuned_model"):
                lineage.update(trained)  # the version answers with the adapter (BetterTogether may pick a prompt step)
        # GEPA's record holds a copy of every candidate program (and its index): logged, never pickled.
        details = optimized.__dict__.pop("detailed_results", None)
        if details is not None:
            tracking.log_table(gepa_candidates(details), "optimizer/gepa_candidates.json")
        tracking.log_candidates(ranked_candidates(optimized, details),
                                keep=kept_candidates(cfg.optimizer))
        tracking.log_optimizer_trials(optimized)
        model = tracking.new_model(variant, variant=variant, tags=lineage)
        # The calls of an LM the program carries are not the session LM's: counted apart.
        carried = "finetuned_" if "finetuned_model" in lineage else "student_"
        with tracking.usage(answering, prefix=carried) if answering else contextlib.nullcontext():
            best = _score(session, optimized, session.splits.dev, step="optimize", split="dev", model=model,
                          dataset=datasets["dev"], variant=variant, phase="optimized")
        comparisons = compare(best, base, session.scoring)
        tracking.log_metrics(tracking.comparison_metrics(comparisons))
        primary = session.scoring.primary
        log.info("optimized - baseline: %s %s", label(primary), comparisons[primary].describe()
                 if primary in comparisons else "not compared: no example was scored on both")
        tracking.log_optimization(optimized, side_by_side=side_by_side(base, best),
                                  learned_prompt=describe_program(optimized))
        model_uri, version = _log_and_register(session, optimized, best, variant=variant, model=model, tags=lineage)
        return StepResult("optimize", active.info.run_id, best, model_uri, version)


def run_evaluate(cfg: Config) -> StepResult:
    """Score any logged or registered program (`model_uri`) on a chosen split, in a new run."""
    if not cfg.get("model_uri"):
        raise ConfigError("evaluate needs model_uri=... (e.g. models:/NAME@champion or runs:/RUN_ID/program)")
    session = prepare(cfg, model_uri=cfg.model_uri)
    program = tracking.load_program(cfg.model_uri)
    split, step = cfg.split, f"evaluate-{cfg.split}"
    with tracking.run(step, cfg, tags={"model_uri": cfg.model_uri}) as active:
        datasets = tracking.log_datasets({split: session.splits.get(split)}, cfg.data)
        model = tracking.logged_model_of(cfg.model_uri)
        variant = {"variant": model.tags["variant"]} if model and "variant" in model.tags else {}
        with tracking.usage(session.lm, judge=session.judge):
            result = _score(session, program, session.splits.get(split), step=step, split=split, model=model,
                            dataset=datasets[split], **variant)
        tracking.log_metrics(tracking.estimate_metrics(result.estimates, f"{split}_", examples=result.num_examples),
                             model=model, dataset=datasets[split])
        tracking.tag_scores(cfg.model_uri, result, split)
        return StepResult(step, active.info.run_id, result, cfg.model_uri)


def run_predict(cfg: Config) -> PredictResult:
    """Answer every question of `input` with the program at `model_uri` on Spark; write them to `output`.
    Bad input, an existing output, no Java or no such model stop before any run opens."""
    missing = [key for key in ("model_uri", "input", "output") if not cfg.get(key)]
    if missing:
        raise ConfigError(f"predict needs {' '.join(f'{k}=...' for k in missing)} (e.g. "
                          "model_uri=models:/NAME@champion input=questions.jsonl output=predictions/)")
    source = batch.check_input(cfg.input)
    output = batch.check_output(cfg.output, overwrite=cfg.overwrite)
    spark.java_home(Path(cfg.paths.cache))
    tracking.setup(cfg)
    tracking.check_model(cfg.model_uri)
    version = tracking.registered_version(cfg.model_uri)
    tags = {"model_uri": cfg.model_uri, **({"model_version": f"{version[0]}/{version[1]}"} if version else {})}
    with tracking.run("predict", cfg, tags=tags) as active:
        session = spark.session(cfg)
        frame = batch.read(session, source)
        tracking.log_spark_input(frame, source.path)
        predictions = batch.predict(session, frame, cfg.model_uri, output, output_format=cfg.output_format,
                                    num_threads=cfg.num_threads, partitions=cfg.spark.partitions,
                                    executor_env=tracking.executor_tracing())
        tracking.log_predictions(predictions, output=output, output_format=cfg.output_format,
                                 executors=spark.executors(session))
        result = PredictResult(run_id=active.info.run_id, predictions=predictions, output=output)
        log.info("predict: %s", result.headline())
        return result


@dataclass(frozen=True, kw_only=True)
class JudgeResult:
    run_id: str
    agreements: list[agreement.Agreement]
    aligned: str | None = None               # the aligned judge's state URI
    alignment: Comparison | None = None      # held-out agreement, aligned - original, 0-100
    registered: tracking.RegisteredJudge | None = None  # its version as the experiment's scorer and prompt
    score = None  # nothing for a sweep to compare

    def headline(self) -> str:
        text = "; ".join(a.describe() for a in self.agreements)
        if self.registered:
            r = self.registered
            text += (f"; aligned judge {r.name} v{r.version}: held-out agreement {self.alignment.describe()} -> "
                     f"scoring.judge={r.name if r.champion else f'{r.name}/{r.prompt_version}'}")
        return text


@dataclass(frozen=True, kw_only=True)
class ReviewResult:
    run_id: str
    queue: str
    items: int
    score = None

    def headline(self) -> str:
        return (f"{self.items} traces in the review queue {self.queue!r}: label them on the experiment's Review "
                "page, then `mlflow run . -e judge`")


REVIEW_INSTRUCTION = ("Is the answer correct and useful for the question, as the reference answer would be? "
                      "Pass or fail; a comment says why.")


def run_review(cfg: Config) -> ReviewResult:
    """`review`: a run's dev traces (`run_id`), or a version's served traffic (`model_uri`), into a review
    queue with the judge's label schema (pass/fail)."""
    if bool(cfg.get("run_id")) == bool(cfg.get("model_uri")):
        raise ConfigError("review needs run_id=<a run that evaluated dev with traces> (e.g. a rag or optimize run) "
                          "or model_uri=<a served version, e.g. models:/NAME@champion>")
    tracking.setup(cfg)
    if cfg.get("model_uri"):
        model = tracking.logged_model_of(cfg.model_uri)
        if model is None:
            raise ConfigError(f"{cfg.model_uri} has no LoggedModel (logged before MLflow 3): its traffic is not linked")
        queue, items = tracking.queue_traffic_for_review(model.model_id, cfg.label_name, REVIEW_INSTRUCTION)
    else:
        queue, items = tracking.queue_for_review(cfg.run_id, cfg.label_name, REVIEW_INSTRUCTION)
    what = cfg.get("run_id") or cfg.model_uri
    if items:
        log.info("queued %d traces of %s for review as %r, label %r", items, what, queue, cfg.label_name)
    else:
        log.info("%s was queued before, as %r: label it on the Review page", what, queue)
    return ReviewResult(run_id=cfg.get("run_id") or "", queue=queue, items=items)


def resolved_judge(scoring: Scoring) -> Scoring:
    """`scoring.judge` as a local copy of the state to load and the version runs record; one that resolves to
    nothing fails here, before any run."""
    if not scoring.judge:
        return scoring
    found = tracking.resolve_judge(scoring.judge)
    return dataclasses.replace(scoring, judge=aligned_state(found.state), judge_version=found.version)


def run_judge(cfg: Config) -> JudgeResult:
    """`judge`: how far the SemanticF1 judge agrees with people's labels of traces (a file, written to the
    traces as HUMAN feedback first, and labels already on the experiment's traces); its own run, step=judge."""
    if cfg.align and not cfg.judge_name:
        raise ConfigError("align=true registers the aligned judge: set judge_name (the scorer's name)")
    from_file = labels.read(Path(cfg.labels)) if cfg.get("labels") else []
    tracking.setup(cfg)
    tracking.check_traces({x.trace_id for x in from_file})
    scoring = resolved_judge(Scoring.from_cfg(cfg.scoring))
    existing = tracking.human_labels(cfg.tracking.experiment, cfg.label_name)
    new_labels = [x for x in from_file if x not in set(existing)]  # a file given twice is written once
    consensus = labels.by_trace(existing + new_labels)
    examples = tracking.labelled_rows({t for t, c in consensus.items() if c.value is not None})
    usable = [t for t, c in consensus.items() if c.value is not None and t in examples]
    if len(usable) < 2:
        raise ConfigError(f"{len(usable)} labelled traces with an evaluated example: the judge's agreement needs at "
                          f"least 2; label traces of an evaluation (labels=FILE, or the {cfg.label_name!r} label on "
                          "the Review page), or served traces that carry a gold answer (the expectation "
                          "expected_response, mlflow.log_expectation)")
    parts = _alignment_split(cfg, usable, consensus, examples) if cfg.align else None
    judge_cfg = merged_judge_cfg(cfg)
    judge_lm = build_lm(judge_cfg)
    ensure_reachable(judge_lm)
    judged = JudgedF1(judge_lm, aligned=scoring.judge, version=scoring.judge_version)
    with tracking.run("judge", cfg, tags={"label_name": cfg.label_name, "judge": judged.name}) as active:
        tracking.log_labels(new_labels, cfg.label_name)
        human, scores, rows = [], [], []
        for trace_id in usable:
            row, before = examples[trace_id], judged.failures
            verdict = judged(dspy.Example(question=row["question"], response=row["gold"]),
                             dspy.Prediction(response=row["prediction"] or ""))
            if judged.failures > before:
                continue  # an unparseable verdict is counted, never scored as agreement
            human.append(consensus[trace_id].value)
            scores.append(float(verdict.score))
            rows.append({"trace_id": trace_id, "question": row["question"], "human": consensus[trace_id].value,
                         "reviewers": consensus[trace_id].reviewers, "judge_score": round(float(verdict.score), 4),
                         "judge_rationale": verdict.feedback,
                         "link": f"#/experiments/{active.info.experiment_id}/traces?selectedEvaluationId={trace_id}"})
        bootstrap = {"confidence": cfg.scoring.confidence, "n_resamples": cfg.scoring.n_resamples,
                     "seed": cfg.scoring.seed}
        found = agreement.measure(human, scores, threshold=cfg.judge_threshold, **bootstrap)
        among = agreement.between_reviewers(existing + new_labels, **bootstrap)
        tracking.log_judge_agreement(found, rows=rows, unparseable=judged.failures,
                                     disagreeing=sum(c.disagree for c in consensus.values()), reviewers=among,
                                     confusion=agreement.confusion(human, [s >= cfg.judge_threshold for s in scores])
                                     if all(isinstance(h, bool) for h in human) else None)
        for a in found:
            log.info("judge vs people: %s", a.describe())
        if among:
            log.info("reviewers vs each other (the ceiling for the judge's kappa): %s", among.describe())
        if parts is None:
            return JudgeResult(run_id=active.info.run_id, agreements=found)
        aligned, comparison, agreed = _align_judge(cfg, scoring, parts, judge_lm)
        uri = tracking.log_aligned_judge(aligned, comparison, held_out=len(parts.held_out), aligned_on=len(parts.align))
        if cfg.mlflow_aligner:
            _mlflow_align_beside(cfg, scoring, parts, examples, judge_lm, agreed)
        short = shortfall(comparison, cfg.scoring.confidence)
        registered = tracking.register_judge(aligned.judge, name=cfg.judge_name, state=uri, lm_model=judge_lm.model,
                                             threshold=cfg.judge_threshold, improved=short is None)
        log.info("aligned judge %s v%d, held-out agreement aligned - original: %s; %s", registered.name,
                 registered.version, comparison.describe(),
                 f"champion: scoring.judge={registered.name}" if registered.champion else
                 f"not champion ({short}); scoring.judge={registered.name}/{registered.prompt_version}")
        return JudgeResult(run_id=active.info.run_id, agreements=found, aligned=uri, alignment=comparison,
                           registered=registered)


@dataclass(frozen=True, kw_only=True)
class AssessResult:
    run_id: str
    traces: int
    estimates: dict[str, Estimate]
    score = None  # nothing for a sweep to compare

    def headline(self) -> str:
        scored = "; ".join(f"{name} {e.describe()}" for name, e in self.estimates.items()) or "no scorer gave a value"
        return f"{self.traces} traces: {scored}"


def run_assess(cfg: Config) -> AssessResult:
    """`assess`: stored traces (a run's, a version's served traffic, or the experiment's) scored with MLflow's
    judges and the project's metrics (`tracking.scorers`); one run with each scorer's mean and interval.
    Unknown scorers, or judges without a judge model, fail before any trace is read."""
    if cfg.get("run_id") and cfg.get("model_uri"):
        raise ConfigError("assess takes run_id=... or model_uri=... (or neither: the whole experiment), not both")
    names, guidelines = list(cfg.scorers or []), list(cfg.guidelines or [])
    judged = [n for n in names if n in scorers.NEEDS_JUDGE]
    judge_cfg = merged_judge_cfg(cfg)
    scorers.check_names(names, judge_model=judge_cfg.get("model") if judged else None, guidelines=guidelines)
    judge_lm = build_lm(judge_cfg) if judged else None
    tracking.setup(cfg)
    experiment_id, model_id = tracking.where(run_id=cfg.get("run_id"), model_uri=cfg.get("model_uri"),
                                             experiment=cfg.tracking.experiment)
    traces = tracking.find_traces(experiment_id=experiment_id, run_id=cfg.get("run_id"), model_id=model_id,
                                  since=cfg.get("since"), until=cfg.get("until"))
    if judge_lm is not None:
        ensure_reachable(judge_lm)
    scoring = resolved_judge(Scoring.from_cfg(cfg.scoring))
    made = scorers.build_scorers(names, judge_model=tracking.judge_model(judge_lm.model) if judge_lm else None,
                                 judge_lm=judge_lm, aligned=scoring.judge, guidelines=guidelines)
    expectations = tracking.expectations_of(traces, cfg.get("run_id"))
    tags = {"assessed": cfg.get("run_id") or cfg.get("model_uri") or f"experiment {experiment_id}",
            "scorers": ",".join(names)}
    endpoint = judge_lm.kwargs if judge_lm is not None else {}
    with tracking.run("assess", cfg, tags=tags) as active, \
            tracking.lm_endpoint(endpoint.get("api_base"), endpoint.get("api_key")):
        values = tracking.assess(traces, made, expectations)
        estimates = {name: scoring.interval(v) for name, v in values.items() if v}
        tracking.log_metrics({**tracking.estimate_metrics(estimates), "traces": len(traces),
                              **{f"{name}_n": len(v) for name, v in values.items()}})
        result = AssessResult(run_id=active.info.run_id, traces=len(traces), estimates=estimates)
        log.info("assess: %s", result.headline())
        return result


def _alignment_split(cfg: Config, usable: list[str], consensus, examples) -> align.Split:
    """The labelled traces as alignment examples, split; too few for either share fails before any run."""
    yes_no = [t for t in usable if isinstance(consensus[t].value, bool)]
    if len(yes_no) < len(usable):
        raise ConfigError("align=true aligns to yes/no labels; these labels are numeric")
    data = [align.example(examples[t]["question"], examples[t]["gold"], examples[t]["prediction"] or "",
                          label=consensus[t].value, trace_id=t, rationale=consensus[t].rationale) for t in yes_no]
    parts = align.split(data, cfg.align_held_out, cfg.scoring.seed)
    if len({e.label for e in parts.align}) < 2:
        given = sum(e.label for e in data)
        raise ConfigError(f"align=true needs yes and no labels to build demos of both: {given} yes and "
                          f"{len(data) - given} no among {len(data)} labelled traces ({len(parts.align)} to align "
                          "on); label traces of the other kind")
    if len(parts.align) < 4 or len(parts.held_out) < 2:
        raise ConfigError(f"{len(data)} labelled traces split into {len(parts.align)} to align on and "
                          f"{len(parts.held_out)} held out: alignment needs at least 4 and 2; label more traces")
    if cfg.mlflow_aligner not in (None, *tracking.ALIGNERS):
        raise ConfigError(f"mlflow_aligner={cfg.mlflow_aligner}: one of {', '.join(tracking.ALIGNERS)} (or null)")
    if cfg.mlflow_aligner == "simba" and len(parts.align) < tracking.SIMBA_MIN_TRACES:
        raise ConfigError(f"mlflow_aligner=simba needs {tracking.SIMBA_MIN_TRACES} labelled traces to align on, "
                          f"the split leaves {len(parts.align)}; label more traces or use memalign")
    return parts


def _align_judge(cfg: Config, scoring: Scoring, parts: align.Split,
                 judge_lm: dspy.LM) -> tuple[align.JudgeProgram, Comparison, list[float | None]]:
    """Compile the judge program to agree with the alignment share; compare held-out agreement, paired.
    Also returns the aligned judge's agreement (100 or 0) per held-out example, None where unparseable."""
    original = align.JudgeProgram()
    if scoring.judge:
        original.judge.load(scoring.judge)
    optimizer = build_optimizer(cfg.optimizer, align.Agrees(cfg.judge_threshold))
    with dspy.context(lm=judge_lm, callbacks=[]), tracking.timed("align"):
        aligned = optimizer.compile(original.deepcopy(), trainset=parts.align, **compile_kwargs(cfg.optimizer))
    def agreed(program: align.JudgeProgram) -> list[float | None]:
        scores = align.verdicts(program, parts.held_out, judge_lm)
        return [None if s is None else 100.0 * ((s >= cfg.judge_threshold) == e.label)
                for s, e in zip(scores, parts.held_out, strict=True)]

    before, after = agreed(original), agreed(aligned)
    pairs = [(b, a) for b, a in zip(before, after, strict=True) if a is not None and b is not None]
    return aligned, scoring.paired([a for _, a in pairs], [b for b, _ in pairs]), after


def _mlflow_align_beside(cfg: Config, scoring: Scoring, parts: align.Split, examples: dict[str, dict],
                         judge_lm: dspy.LM, dspy_agreed: list[float | None]) -> None:
    """MLflow's `Judge.align` (SIMBA or MemAlign) on the same alignment share, measured on the same held-out
    share: its gain over its own unaligned judge, and its agreement against the DSPy-aligned judge's,
    paired. Its aligned judge is registered beside the other (`<judge_name>-<aligner>`)."""
    endpoint = {"api_base": judge_lm.kwargs.get("api_base"), "api_key": judge_lm.kwargs.get("api_key")}
    model = tracking.judge_model(judge_lm.model)
    tracking.log_gold({e.trace_id: examples[e.trace_id] for e in parts.align + parts.held_out})
    base = tracking.pass_fail_judge(name=cfg.label_name, instruction=REVIEW_INSTRUCTION, model=model,
                                    api_base=endpoint["api_base"])
    with tracking.timed(f"align_{cfg.mlflow_aligner}"):
        aligned = tracking.mlflow_align(base, trace_ids=[e.trace_id for e in parts.align], aligner=cfg.mlflow_aligner,
                                        model=model, embedding_model=cfg.mlflow_embedding_model, **endpoint)
    rows = [examples[e.trace_id] for e in parts.held_out]
    before, after = (tracking.mlflow_verdicts(j, rows, **endpoint) for j in (base, aligned))
    usable = [i for i in range(len(rows)) if None not in (before[i], after[i], dspy_agreed[i])]

    def agreed(verdicts: list[bool | None]) -> list[float]:
        return [100.0 * (verdicts[i] == parts.held_out[i].label) for i in usable]

    gain = scoring.paired(agreed(after), agreed(before))
    versus = scoring.paired(agreed(after), [dspy_agreed[i] for i in usable])
    name = f"{cfg.judge_name}-{cfg.mlflow_aligner}"
    tracking.log_mlflow_alignment(aligned, name=name, gain=gain, versus=versus,
                                  unparseable=len(rows) - len(usable))
    log.info("MLflow's %s: held-out agreement aligned - unaligned %s; against the DSPy-aligned judge %s "
             "(registered as %s)", cfg.mlflow_aligner, gain.describe(), versus.describe(), name)


VARIANTS = ("cot", "rag", "multihop", "ensemble")  # main's steps that evaluate a program as configured
OPTIMIZING = ("optimize", "gepa", "finetune")       # main's steps that compile one
SCORING_CANDIDATES = ("optimize", "gepa")            # ... and keep scored candidates an ensemble is made of
MATCHED = re.compile(r"rag-k(\d+)")                 # rag with as many passages as multihop reads


def main_steps(cfg: Config, overrides: Sequence[str] = ()) -> list[str]:
    """The steps `main` runs, in order: `steps`, with `rag-k<hops x k>` after multihop (`matched_rag`)."""
    unknown = [s for s in cfg.steps if s not in (*VARIANTS, *OPTIMIZING)]
    if unknown:
        raise ConfigError(f"unknown steps {unknown}; choose from {sorted((*VARIANTS, *OPTIMIZING))}")
    steps = []
    for step in cfg.steps:
        steps.append(step)
        if step == "multihop" and cfg.matched_rag:
            multihop = step_config(cfg, step, overrides).program
            check_program(multihop)  # its hops and k name the matched step
            steps.append(f"rag-k{multihop.hops * multihop.k}")
    return list(dict.fromkeys(steps))


def step_config(cfg: Config, step: str, overrides: Sequence[str] = ()) -> Config:
    """A step's own config with main's overrides; `gepa` and `finetune` are the optimize entry point with
    main's `gepa_optimizer` / `finetune_optimizer` preset, `rag-k<N>` the rag entry point with N passages."""
    from pipelines.config import compose

    if step in ("gepa", "finetune"):
        return compose("optimize", [*overrides, f"optimizer={cfg[f'{step}_optimizer']}"])
    if matched := MATCHED.fullmatch(step):
        return compose("rag", [*overrides, f"program.k={matched[1]}"])
    return compose(step, overrides)


def check_main(cfg: Config, overrides: Sequence[str] = ()) -> dict[str, Config]:
    """`main`'s steps in order, each with its config, every one checked as the step checks it itself
    (`check_step`, an ensemble's members) and with what main implies (the matched rag step, an ensemble of
    the optimize step before it), with no LM built or called and no run opened."""
    steps = main_steps(cfg, overrides)
    configs = {step: step_config(cfg, step, overrides) for step in steps}
    for step, step_cfg in configs.items():
        check_step(step_cfg, optimizing=step in OPTIMIZING)
    if "ensemble" in configs:
        _check_ensemble_step(steps, configs)
    return configs


def _check_ensemble_step(steps: list[str], configs: dict[str, Config]) -> None:
    """The members `ensemble.*` names, or else the best candidates of the last optimize (or gepa) step
    before it: as many as that step keeps, and enough for the reducer."""
    ensemble = configs["ensemble"].ensemble
    if any(ensemble.get(source) for source in members.SOURCES):
        members.check(ensemble)
        return
    compiling = [s for s in steps[:steps.index("ensemble")] if s in SCORING_CANDIDATES]
    if not compiling:
        raise ConfigError("the ensemble step is made of the best candidates of an optimize (or gepa) step "
                          "before it, or of the members ensemble.* names: add optimize before ensemble in "
                          "steps, or set ensemble.members / ensemble.candidates_of / ensemble.samples_of")
    members.check_size(ensemble, "candidates_of")
    keep = kept_candidates(configs[compiling[-1]].optimizer)
    if keep < ensemble.size:
        raise ConfigError(f"ensemble.size={ensemble.size}, but the {compiling[-1]} step keeps {keep} candidate "
                          f"programs (optimizer.keep_candidates={keep}): raise optimizer.keep_candidates or lower "
                          "ensemble.size")


def _run_step(step: str, step_cfg: Config, earlier: list[StepResult]) -> StepResult:
    if step in OPTIMIZING:
        return run_optimize(step_cfg)
    if step == "ensemble" and not any(step_cfg.ensemble.get(source) for source in members.SOURCES):
        compiled = [r for r in earlier if r.name in SCORING_CANDIDATES][-1]
        step_cfg.ensemble.candidates_of = compiled.run_id
        log.info("ensemble: the %d best candidates of the %s step (run %s)", step_cfg.ensemble.size, compiled.name,
                 compiled.run_id)
    return run_variant(step_cfg, name=step if MATCHED.fullmatch(step) else None)


def run_pipeline(cfg: Config, overrides: Sequence[str] = ()) -> StepResult:
    """One parent run; each step composed from its own config with the same overrides, as a child.

    The steps score the same dev set, so every pair is compared example by example, on each metric; the
    parent also shows where each step's answers fail (`failure_modes.png`) and what they cost against
    what they score (`quality_cost.png`).
    """
    configs = check_main(cfg, overrides)  # every step's bad input fails before any LM starts
    session = prepare(cfg)  # the LM reached before the parent run opens
    scoring = session.scoring
    results = []
    with tracking.run("main", cfg) as parent:
        for step, step_cfg in configs.items():
            results.append(dataclasses.replace(_run_step(step, step_cfg, results), name=step))
        metrics, rows = {}, []
        for r in results:
            log.info("%s: %s", r.name, r.result.headline())
            metrics.update(tracking.estimate_metrics(r.result.estimates, f"{r.name}_", examples=r.result.num_examples))
            metrics.update(tracking.failure_metrics(r.result, f"{r.name}_"))
            rows.append({"variant": r.name, **comparison_row(r.result.estimates.get(scoring.primary), scoring.primary),
                         "run_id": r.run_id, "model_uri": r.model_uri,
                         "registered_version": str(r.version) if r.version else None})
        for old, new in itertools.combinations(results, 2):
            comparisons = compare(new.result, old.result, scoring)
            metrics.update(tracking.comparison_metrics(comparisons, f"{new.name}_vs_{old.name}_"))
            if scoring.primary in comparisons:
                comparison = comparisons[scoring.primary]
                rows.append({"variant": f"{new.name} - {old.name}",
                             **comparison_row(comparison.delta, scoring.primary), "p_value": comparison.p_value})
                log.info("%s - %s: %s %s", new.name, old.name, label(scoring.primary), comparison.describe())
        scored = [r for r in results if r.score is not None]  # the judge may have scored none of a step's answers
        best = max(scored or results, key=lambda r: r.score or 0.0)
        best_name = best.name if scored else f"none: no step was scored on {scoring.primary}"
        costs = quality_cost_rows([(r.name, r.result) for r in results], scoring.primary)
        for row in costs:
            log.info("%s: %s per question%s", row["variant"], _cost_text(row),
                     " (not beaten on both quality and cost)" if row["pareto"] else "")
        tracking.log_comparison(metrics=metrics, rows=rows, chart=comparison_chart(rows[: len(results)], scoring),
                                best_variant=best_name)
        tracking.log_analysis(failures=failure_chart([(r.name, r.result) for r in results]), costs=costs,
                              cost_chart=quality_cost_chart(costs, scoring))
        log.info("best variant by point score: %s", best_name)
        return StepResult("main", parent.info.run_id, best.result, best.model_uri, best.version)


def _cost_text(row: dict) -> str:
    text = f"{row['tokens_per_question']:.0f} tokens in {row['lm_calls_per_question']:.1f} LM calls"
    if row.get("cost_per_1k_questions_usd") is not None:
        text += f", ${row['cost_per_1k_questions_usd']:.2f} per 1,000 questions"
    return text
