"""The model registry: register a logged program, record its scores, and move `champion` by the rule
in `pipelines.evaluation.promotion`.

A version carries the few tags a person reads in the versions list (`variant`, the primary dev score
with its interval, the promotion verdict); every number (dev scores and intervals, the difference
with the champion) is a metric of the version's LoggedModel, a column in the UI's models table. The
dev set's content hash is a LoggedModel tag, so later versions know what they compare against.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from pipelines.evaluation.metrics import JUDGED_METRICS
from pipelines.evaluation.promotion import Champion, Promotion, decide
from pipelines.evaluation.result import EvalResult
from pipelines.evaluation.scoring import Scoring
from pipelines.tracking.evaluation import comparison_metrics, estimate_metrics, load_table

log = logging.getLogger(__name__)

CHAMPION = "champion"
DEV_TABLE = "eval/dev_results.json"  # per-example dev scores of the program a run registers
DEV_SET = "dev_set"  # LoggedModel tag: content hash of the dev set it was scored on
JUDGE = "judge"      # LoggedModel tag: the judge that scored its judged primary metric


@dataclass(frozen=True, kw_only=True)
class Registration:
    version: str
    promotion: Promotion

    @property
    def promoted(self) -> bool:
        return self.promotion.promoted


def register(model_uri: str, *, registered_model: str, model_id: str, result: EvalResult, dev_set: str,
             variant: str, scoring: Scoring, tags: dict[str, str] | None = None) -> Registration:
    """Register `model_uri` (LoggedModel `model_id`), record its dev scores, and move `champion` to it if
    `scoring.promotion` says so against the current champion's per-example scores on the same dev set."""
    client = MlflowClient()
    judged = {JUDGE: result.judge} if scoring.primary in JUDGED_METRICS and result.judge else {}
    mlflow.set_logged_model_tags(model_id, {DEV_SET: dev_set, "primary_metric": scoring.primary, **judged})
    version = mlflow.register_model(model_uri, registered_model).version
    primary = f"dev_{scoring.primary}"
    # Before any alias points here: a champion always has its scores.
    _tag(registered_model, version, {"variant": variant, primary: result.describe(scoring.primary),
                                     **(tags or {})})
    current = champion(registered_model)
    promotion = decide(new=result, dev_set=dev_set, champion=_as_champion(current, scoring), scoring=scoring)
    if promotion.promoted:
        client.set_registered_model_alias(registered_model, CHAMPION, version)
    _tag(registered_model, version, {"promotion": promotion.reason})
    metrics = estimate_metrics(result.estimates, "dev_", examples=result.num_examples)
    if promotion.comparison is not None:
        metrics.update(comparison_metrics({primary: promotion.comparison}, "vs_champion_"))
    mlflow.log_metrics(metrics, model_id=model_id)
    log.info("Registered %s version %s (dev %s): %s", registered_model, version, result.headline(), promotion.reason)
    # Which version is champion now is the registry's alias, not a run tag that would go stale.
    mlflow.set_tags({"registered_model": registered_model, "registered_version": version,
                     "promotion_at_registration": promotion.reason})
    return Registration(version=str(version), promotion=promotion)


def champion(registered_model: str) -> ModelVersion | None:
    try:
        return MlflowClient().get_model_version_by_alias(registered_model, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None


def _as_champion(version: ModelVersion | None, scoring: Scoring) -> Champion | None:
    """What the rule needs of the champion: its dev set and score from its LoggedModel (versions
    registered before scores moved there keep them as version tags), and its per-example dev rows."""
    if version is None:
        return None
    metric = f"dev_{scoring.primary}"
    tags, score = dict(version.tags), None
    model_id = version.model_id or _logged_model_id(version.source)
    if model_id:
        model = mlflow.get_logged_model(model_id)
        tags.update(model.tags)
        score = next((m.value for m in model.metrics or [] if m.key == metric), None)
    if score is None and re.fullmatch(r"-?[\d.]+", tags.get(metric, "")):
        score = float(tags[metric])
    dev_set = tags.get(DEV_SET)
    return Champion(version=str(version.version), dev_set=dev_set, score=score, judge=tags.get(JUDGE),
                    rows=load_table(version.run_id, DEV_TABLE) if dev_set else None)


def _logged_model_id(source: str) -> str | None:
    """The LoggedModel a version was registered from (`models:/m-...`; sqlite stores leave
    `ModelVersion.model_id` empty)."""
    match = re.fullmatch(r"models:/(m-[0-9a-f]+)", source or "")
    return match[1] if match else None


def registered_version(model_uri: str) -> tuple[str, str] | None:
    """(name, version) of the registry version behind a `models:/NAME/VERSION` or `models:/NAME@ALIAS`
    URI, as it is now; None for other URIs."""
    match = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@(\w+))", model_uri)
    if not match:
        return None
    name, version, alias = match.groups()
    return name, str(MlflowClient().get_model_version_by_alias(name, alias).version if alias else version)


def tag_scores(model_uri: str, result: EvalResult, split: str) -> None:
    """Record a split's primary score on the registry version behind `model_uri`, for the versions list
    (the full scores are the run's metrics)."""
    if found := registered_version(model_uri):
        _tag(*found, {f"{split}_{result.primary}": result.describe(result.primary)})


def _tag(registered_model: str, version: str, tags: dict[str, str]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(registered_model, version, key, value)

