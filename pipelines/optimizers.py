"""Optimizers from config: an `optimizer/` preset names the class (`_target_`) and its arguments.

`optimizer=gepa` is a config file, not a code path: every preset is built by `build_optimizer` and
compiled the same way. Only the runtime objects an optimizer takes differ (GEPA's reflection LM and
feedback metric), and those are built in `pipelines.steps`.
"""

from __future__ import annotations

import json
from typing import Any

import dspy
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pipelines.config import ConfigError
from pipelines.lm import check_credentials, merged_reflection_cfg

# Keys of a preset that are ours, not the constructor's: the variant label, compile() arguments, the
# reflection LM's config (the constructor gets the built LM) and how many scored candidates the run keeps.
OWN_KEYS = ("name", "compile", "reflection_lm", "keep_candidates")
GEPA_DEFAULT_REFLECTION_MINIBATCH = 3


def build_optimizer(opt_cfg, metric, **runtime: Any) -> dspy.teleprompt.Teleprompter:
    """The optimizer `_target_` names, with the preset's constructor arguments plus `runtime` objects."""
    kwargs = {k: v for k, v in OmegaConf.to_container(opt_cfg, resolve=True).items() if k not in OWN_KEYS}
    try:
        return instantiate(kwargs, metric=metric, _convert_="all", **runtime)
    except InstantiationException as e:
        raise ConfigError(f"optimizer={opt_cfg.name}: {' '.join(str(e).split())}") from None


def compile_kwargs(opt_cfg) -> dict[str, Any]:
    return OmegaConf.to_container(opt_cfg.compile, resolve=True) if opt_cfg.get("compile") else {}


def reflective(opt_cfg) -> bool:
    """Whether the optimizer learns from a reflection LM reading metric feedback (GEPA)."""
    return "reflection_lm" in opt_cfg


def check_reflection(cfg, train_size: int):
    """Fail before any work on a GEPA budget too small for one reflection round, or an unusable
    reflection LM config; returns the reflection LM's config."""
    opt = cfg.optimizer
    # With no valset GEPA scores the seed program on all of train, then each round scores a
    # minibatch twice (parent, then child): less than that and it never reflects.
    minibatch = min(int(opt.get("reflection_minibatch_size") or GEPA_DEFAULT_REFLECTION_MINIBATCH), train_size)
    needed = train_size + 2 * minibatch
    if opt.get("max_metric_calls") is not None:
        budget, setting = int(opt.max_metric_calls), f"optimizer.max_metric_calls={opt.max_metric_calls}"
    elif opt.get("max_full_evals") is not None:
        budget, setting = int(opt.max_full_evals) * train_size, f"optimizer.max_full_evals={opt.max_full_evals}"
    else:
        budget, setting = needed, ""  # `auto` budgets always cover several rounds
    if budget < needed:
        raise ConfigError(f"{setting} gives GEPA {budget} metric calls, too few for one reflection round: it needs "
                          f"{needed} ({train_size} to score the seed program on train, 2 x {minibatch} per round)")
    reflection_cfg = merged_reflection_cfg(cfg)
    check_credentials(reflection_cfg)
    return reflection_cfg


def gepa_candidates(details) -> list[dict[str, Any]]:
    """One row per candidate GEPA kept (`detailed_results` of `track_stats=True`), scores 0-100 like ours."""
    return [{"candidate": i, "parents": str(details.parents[i]), "train_semantic_f1": 100 * score,
             "found_at_metric_calls": details.discovery_eval_counts[i], "best": i == details.best_idx,
             **{f"instructions.{name}": p.signature.instructions for name, p in candidate.named_predictors()}}
            for i, (candidate, score) in enumerate(zip(details.candidates, details.val_aggregate_scores, strict=True))]


def ranked_candidates(optimized: dspy.Module, details=None) -> list[tuple[float, dspy.Module]]:
    """The distinct programs an optimizer scored, best first, as (score 0-100, program): MIPROv2's fully
    evaluated trials (`candidate_programs`), or GEPA's kept candidates (`detailed_results` of
    `track_stats=True`, scored on its validation set). Programs with the same instructions and demos are one."""
    if details is not None:
        scored = [(100 * s, p) for p, s in zip(details.candidates, details.val_aggregate_scores, strict=True)]
    else:
        scored = [(float(c["score"]), c["program"]) for c in getattr(optimized, "candidate_programs", None) or []]
    seen, ranked = set(), []
    for score, program in sorted(scored, key=lambda c: -c[0]):
        state = json.dumps(program.dump_state(), sort_keys=True, default=str)
        if state not in seen:
            seen.add(state)
            ranked.append((score, program))
    return ranked
