"""`mlflow run . -e evaluate`: any logged or registered program (`model_uri`) scored on a chosen split, in
a run of its own."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipelines.errors import ConfigError
from pipelines.steps.in_run import score
from pipelines.steps.results import StepResult
from pipelines.steps.session import prepare
from pipelines.tracking.evaluation import estimate_metrics, log_datasets, log_metrics
from pipelines.tracking.models import load_program, logged_model_of
from pipelines.tracking.registry import tag_scores
from pipelines.tracking.runs import run
from pipelines.tracking.usage import usage

if TYPE_CHECKING:
    from pipelines.schema import Config


def run_evaluate(cfg: Config) -> StepResult:
    """Score any logged or registered program (`model_uri`) on a chosen split, in a new run."""
    if not cfg.get("model_uri"):
        raise ConfigError("evaluate needs model_uri=... (e.g. models:/NAME@champion or runs:/RUN_ID/program)")
    session = prepare(cfg, model_uri=cfg.model_uri)
    program = load_program(cfg.model_uri)
    split, step = cfg.split, f"evaluate-{cfg.split}"
    with run(step, cfg, tags={"model_uri": cfg.model_uri}) as active:
        datasets = log_datasets({split: session.splits.get(split)}, cfg.data)
        model = logged_model_of(cfg.model_uri)
        variant = {"variant": model.tags["variant"]} if model and "variant" in model.tags else {}
        with usage(session.lm, judge=session.judge):
            result = score(session, program, session.splits.get(split), step=step, split=split, model=model,
                           dataset=datasets[split], **variant)
        log_metrics(estimate_metrics(result.estimates, f"{split}_", examples=result.num_examples),
                    model=model, dataset=datasets[split])
        tag_scores(cfg.model_uri, result, split)
        return StepResult(name=step, run_id=active.info.run_id, result=result, model_uri=cfg.model_uri)
