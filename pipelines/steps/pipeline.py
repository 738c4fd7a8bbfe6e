"""`mlflow run .` (main): its steps checked first, all of them, then run as child runs of one parent, which
compares them example by example and shows where each fails and what each costs."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipelines.errors import ConfigError
from pipelines.evaluation.metrics import label
from pipelines.evaluation.report import (
    comparison_chart,
    comparison_row,
    failure_chart,
    pairwise,
    quality_cost_chart,
    quality_cost_rows,
)
from pipelines.optimizers import kept_candidates
from pipelines.programs import check_program
from pipelines.steps import members
from pipelines.steps.optimize import run_optimize
from pipelines.steps.results import StepResult
from pipelines.steps.session import check_step, prepare
from pipelines.steps.variant import run_variant
from pipelines.tracking.evaluation import comparison_metrics, estimate_metrics, failure_metrics
from pipelines.tracking.reports import log_analysis, log_comparison
from pipelines.tracking.runs import run

if TYPE_CHECKING:
    from pipelines.schema import Config


log = logging.getLogger(__name__)


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
    with run("main", cfg) as parent:
        for step, step_cfg in configs.items():
            results.append(dataclasses.replace(_run_step(step, step_cfg, results), name=step))
        metrics, rows = {}, []
        for r in results:
            log.info("%s: %s", r.name, r.result.headline())
            metrics.update(estimate_metrics(r.result.estimates, f"{r.name}_", examples=r.result.num_examples))
            metrics.update(failure_metrics(r.result, f"{r.name}_"))
            rows.append({"variant": r.name, **comparison_row(r.result.estimates.get(scoring.primary), scoring.primary),
                         "run_id": r.run_id, "model_uri": r.model_uri,
                         "registered_version": str(r.version) if r.version else None})
        for pair in pairwise([(r.name, r.result) for r in results], scoring):
            metrics.update(comparison_metrics(pair.comparisons, f"{pair.new}_vs_{pair.old}_"))
            row = pair.row(scoring.primary)
            if row is not None:
                rows.append(row)
                log.info("%s - %s: %s %s", pair.new, pair.old, label(scoring.primary),
                         pair.comparisons[scoring.primary].describe())
        scored = [r for r in results if r.score is not None]  # the judge may have scored none of a step's answers
        best = max(scored or results, key=lambda r: r.score or 0.0)
        best_name = best.name if scored else f"none: no step was scored on {scoring.primary}"
        costs = quality_cost_rows([(r.name, r.result) for r in results], scoring.primary)
        for row in costs:
            log.info("%s: %s per question%s", row["variant"], _cost_text(row),
                     " (not beaten on both quality and cost)" if row["pareto"] else "")
        log_comparison(metrics=metrics, rows=rows, chart=comparison_chart(rows[: len(results)], scoring),
                       best_variant=best_name)
        log_analysis(failures=failure_chart([(r.name, r.result) for r in results]), costs=costs,
                     cost_chart=quality_cost_chart(costs, scoring))
        log.info("best variant by point score: %s", best_name)
        return StepResult(name="main", run_id=parent.info.run_id, result=best.result, model_uri=best.model_uri,
                          version=best.version)


def _cost_text(row: dict) -> str:
    text = f"{row['tokens_per_question']:.0f} tokens in {row['lm_calls_per_question']:.1f} LM calls"
    if row.get("cost_per_1k_questions_usd") is not None:
        text += f", ${row['cost_per_1k_questions_usd']:.2f} per 1,000 questions"
    return text
