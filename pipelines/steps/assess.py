"""`mlflow run . -e assess`: stored traces (a run's, a version's served traffic, or the experiment's) scored
with MLflow's judges and the project's metrics, in one run with each scorer's mean and interval."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pipelines.errors import ConfigError
from pipelines.evaluation.scoring import Scoring
from pipelines.lm import build_lm, ensure_reachable, merged_judge_cfg
from pipelines.steps.results import AssessResult
from pipelines.steps.session import resolved_judge
from pipelines.tracking import scorers
from pipelines.tracking.assess import assess, expectations_of, find_traces, where
from pipelines.tracking.evaluation import estimate_metrics, log_metrics
from pipelines.tracking.judging.mlflow_align import lm_endpoint
from pipelines.tracking.judging.registry import judge_model
from pipelines.tracking.runs import run
from pipelines.tracking.store import setup

if TYPE_CHECKING:
    from pipelines.schema import Config

log = logging.getLogger(__name__)


def run_assess(cfg: Config) -> AssessResult:
    """`assess`: stored traces (a run's, a version's served traffic, or the experiment's) scored with MLflow's
    judges and the project's metrics (`tracking.scorers`); one run with each scorer's mean and interval.
    Unknown scorers, or judges without a judge model, fail before any trace is read."""
    if cfg.get("run_id") and cfg.get("model_uri"):
        raise ConfigError("assess takes run_id=... or model_uri=... (or neither: the whole experiment), not both")
    names, guidelines = list(cfg.scorers or []), list(cfg.guidelines or [])
    scoring = Scoring.from_cfg(cfg.scoring)
    judged = [n for n in names if n in scorers.NEEDS_JUDGE]
    judge_cfg = merged_judge_cfg(cfg)
    scorers.check_names(names, judge_model=judge_cfg.get("model") if judged else None, guidelines=guidelines)
    judge_lm = build_lm(judge_cfg) if judged else None
    setup(cfg)
    scoring = resolved_judge(scoring)  # a scoring.judge that names nothing fails before any trace is read
    experiment_id, model_id = where(run_id=cfg.get("run_id"), model_uri=cfg.get("model_uri"),
                                    experiment=cfg.tracking.experiment)
    traces = find_traces(experiment_id=experiment_id, run_id=cfg.get("run_id"), model_id=model_id,
                         since=cfg.get("since"), until=cfg.get("until"))
    if judge_lm is not None:
        ensure_reachable(judge_lm)
    made = scorers.build_scorers(names, judge_model=judge_model(judge_lm.model) if judge_lm else None,
                                 judge_lm=judge_lm, aligned=scoring.judge, guidelines=guidelines)
    expectations = expectations_of(traces, cfg.get("run_id"))
    tags = {"assessed": cfg.get("run_id") or cfg.get("model_uri") or f"experiment {experiment_id}",
            "scorers": ",".join(names)}
    endpoint = judge_lm.kwargs if judge_lm is not None else {}
    with run("assess", cfg, tags=tags) as active, \
            lm_endpoint(endpoint.get("api_base"), endpoint.get("api_key")):
        values = assess(traces, made, expectations)
        estimates = {name: scoring.interval(v) for name, v in values.items() if v}
        log_metrics({**estimate_metrics(estimates), "traces": len(traces),
                     **{f"{name}_n": len(v) for name, v in values.items()}})
        result = AssessResult(run_id=active.info.run_id, traces=len(traces), estimates=estimates)
        log.info("assess: %s", result.headline())
        return result
