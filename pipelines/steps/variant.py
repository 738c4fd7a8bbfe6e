"""`mlflow run . -e cot|rag|multihop|ensemble`: a program as configured (not compiled), scored on dev,
logged and registered."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipelines.programs import build_program
from pipelines.steps.in_run import log_and_register, score, step_run
from pipelines.steps.results import StepResult
from pipelines.steps.session import RETRIEVING, build_retriever, prepare
from pipelines.tracking.models import new_model
from pipelines.tracking.reports import log_ensemble
from pipelines.tracking.usage import usage

if TYPE_CHECKING:
    from pipelines.schema import Config


def run_variant(cfg: Config, *, name: str | None = None) -> StepResult:
    """`cot`, `rag`, `multihop` or `ensemble`: evaluate the program as configured (not compiled) on dev, log
    it and register it. `name` names the run and variant (default: the program's name)."""
    session = prepare(cfg)
    variant = name or str(cfg.program.name)
    retriever, index_info = build_retriever(cfg) if cfg.program.name in RETRIEVING else (None, None)
    with step_run(session, variant, variant=variant, index_info=index_info) as (active, datasets):
        program = session.ensemble or build_program(cfg.program, cfg.lm, retriever)
        if session.ensemble:
            log_ensemble(session.ensemble)
        model = new_model(variant, variant=variant)
        with usage(session.lm, judge=session.judge):
            result = score(session, program, session.splits.dev, step=variant, split="dev", model=model,
                           dataset=datasets["dev"], variant=variant)
        model_uri, version = log_and_register(session, program, result, variant=variant, model=model)
        return StepResult(name=variant, run_id=active.info.run_id, result=result, model_uri=model_uri, version=version)
