"""`mlflow run . -e optimize`: the program compiled on train by the configured optimizer (MIPROv2, GEPA,
BootstrapFinetune, BetterTogether, ...), baseline and optimized scored on dev, the best registered."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dspy
from dspy.teleprompt.gepa.instruction_proposal import InstructionProposer
from hydra.utils import get_class

from pipelines.evaluation.feedback import FeedbackF1
from pipelines.evaluation.metrics import label
from pipelines.evaluation.report import describe_program, side_by_side
from pipelines.evaluation.result import compare
from pipelines.lm import build_adapter, build_lm, ensure_reachable, merged_reflection_cfg, merged_teacher_cfg
from pipelines.optimizers import (
    AtLeast,
    Compiling,
    build_optimizer,
    compile_kwargs,
    finetune_provider,
    gepa_candidates,
    kept_candidates,
    nested,
    ranked_candidates,
    reflective,
    teaching,
)
from pipelines.programs import build_program, program_lm
from pipelines.steps.in_run import log_and_register, score, step_run
from pipelines.steps.results import StepResult
from pipelines.steps.session import RETRIEVING, Session, build_retriever, prepare
from pipelines.tracking.candidates import log_candidates
from pipelines.tracking.evaluation import comparison_metrics, log_metrics, log_table
from pipelines.tracking.finetune import log_finetune, step_metric
from pipelines.tracking.models import new_model
from pipelines.tracking.optimizers import GEPAProgress, log_optimizer_trials
from pipelines.tracking.reports import log_optimization
from pipelines.tracking.usage import timed, usage

if TYPE_CHECKING:
    from pipelines.schema import Config


log = logging.getLogger(__name__)


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
                                gepa_kwargs={"callbacks": [GEPAProgress()]})
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
    with step_run(session, "optimize", variant=variant, index_info=index_info, tags=lineage) as (active, datasets), \
            usage(session.lm, judge=session.judge, reflection=compiling.reflection_lm,
                  teacher=compiling.teacher_lm):
        baseline = build_program(cfg.program, cfg.lm, retriever)
        base = score(session, baseline, session.splits.dev, step="optimize", split="dev", prefix="baseline_",
                     model=new_model(baseline_variant, variant=baseline_variant, external=True),
                     dataset=datasets["dev"], variant=baseline_variant, phase="baseline")
        if compiling.provider is not None:
            compiling.provider.on_step = step_metric("finetune_loss")
        with timed("compile"):
            optimized = compiling.compile(baseline.deepcopy(), trainset=session.splits.train,
                                          **compile_kwargs(cfg.optimizer))
        answering = program_lm(optimized)  # the LM its predictors carry (finetuning sets one), else None
        if compiling.provider is not None:
            trained = log_finetune(compiling.provider)
            if answering is not None and answering.model == trained.get("finetuned_model"):
                lineage.update(trained)  # the version answers with the adapter (BetterTogether may pick a prompt step)
        # GEPA's record holds a copy of every candidate program (and its index): logged, never pickled.
        details = optimized.__dict__.pop("detailed_results", None)
        if details is not None:
            log_table(gepa_candidates(details), "optimizer/gepa_candidates.json")
        log_candidates(ranked_candidates(optimized, details),
                       keep=kept_candidates(cfg.optimizer))
        log_optimizer_trials(optimized)
        model = new_model(variant, variant=variant, tags=lineage)
        # The calls of an LM the program carries are not the session LM's: counted apart.
        carried = "finetuned_" if "finetuned_model" in lineage else "student_"
        with usage(answering, prefix=carried) if answering else contextlib.nullcontext():
            best = score(session, optimized, session.splits.dev, step="optimize", split="dev", model=model,
                         dataset=datasets["dev"], variant=variant, phase="optimized")
        comparisons = compare(best, base, session.scoring)
        log_metrics(comparison_metrics(comparisons))
        primary = session.scoring.primary
        log.info("optimized - baseline: %s %s", label(primary), comparisons[primary].describe()
                 if primary in comparisons else "not compared: no example was scored on both")
        log_optimization(optimized, side_by_side=side_by_side(base, best),
                         learned_prompt=describe_program(optimized))
        model_uri, version = log_and_register(session, optimized, best, variant=variant, model=model, tags=lineage)
        return StepResult(name="optimize", run_id=active.info.run_id, result=best, model_uri=model_uri, version=version)
