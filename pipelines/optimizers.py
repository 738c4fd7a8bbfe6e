"""Optimizers from config: an `optimizer/` preset names the class (`_target_`) and its arguments.

`optimizer=gepa` is a config file, not a code path: every preset is built by `build_optimizer` and
compiled the same way. Only the runtime objects an optimizer takes differ (GEPA's reflection LM and
feedback metric), and those are built in `pipelines.steps`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dspy
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pipelines.errors import ConfigError
from pipelines.lm import check_credentials, merged_reflection_cfg, merged_teacher_cfg
from pipelines.schema import ProgramName

# Keys of a preset that are ours, not the constructor's: the variant label, compile() arguments, the
# reflection LM's and the teacher's configs (the optimizer gets the built LMs), how many scored candidates
# the run keeps, and the finetuning settings (the provider gets them).
OWN_KEYS = ("name", "compile", "reflection_lm", "teacher", "keep_candidates", "finetune")
GEPA_DEFAULT_REFLECTION_MINIBATCH = 3
DEFAULT_KEEP_CANDIDATES = 5


def build_optimizer(opt_cfg, metric, **runtime: Any) -> dspy.teleprompt.Teleprompter:
    """The optimizer `_target_` names, with the preset's constructor arguments plus `runtime` objects."""
    kwargs = {k: v for k, v in OmegaConf.to_container(opt_cfg, resolve=True).items() if k not in OWN_KEYS}
    try:
        return instantiate(kwargs, metric=metric, _convert_="all", **runtime)
    except InstantiationException as e:
        raise ConfigError(f"optimizer={opt_cfg.name}: {' '.join(str(e).split())}") from None


class AtLeast:
    """A metric as pass/fail at `threshold` (0-1): what BootstrapFinetune keeps a trace by (it trains on
    every trace whose score is truthy, and a token F1 of 0.02 is). No `__name__`, like `Scorer`."""

    def __init__(self, metric, threshold: float):
        self.metric, self.threshold = metric, threshold

    def __call__(self, example, prediction, trace=None) -> bool:
        return self.metric(example, prediction, trace) >= self.threshold


@dataclass
class Compiling:
    """An optimizer with what it learns from besides the student: a reflection LM (GEPA), a teacher LM
    (through `teacher_settings`, or as a teacher program for BootstrapFinetune and BetterTogether), a
    finetuning provider."""

    optimizer: dspy.teleprompt.Teleprompter
    reflection_lm: dspy.LM | None = None
    teacher_lm: dspy.LM | None = None
    teacher_adapter: dspy.Adapter | None = None
    teaching: str | None = None
    provider: Any = None  # pipelines.finetune.provider.LoRAProvider

    def compile(self, student: dspy.Module, *, trainset: list[dspy.Example], **kwargs: Any) -> dspy.Module:
        """Compile `student` (a copy the optimizer may change). A finetuned program's predictors carry the
        finetuned LM, served with its adapter."""
        if self.provider is not None:
            # BootstrapFinetune finetunes each predictor's own LM: the student's, with our provider.
            lm = dspy.settings.lm.copy()
            lm.provider = self.provider
            student.set_lm(lm)
        if self.teaching == "program" and self.teacher_lm is not None:
            kwargs["teacher"] = taught(student, self.teacher_lm, self.teacher_adapter)
        try:
            optimized = self.optimizer.compile(student, trainset=trainset, **kwargs)
        finally:
            if self.provider is not None:
                self.provider.stopping = True  # a training thread still running (Ctrl-C) ends at its next step
        return optimized


def taught(student: dspy.Module, lm: dspy.LM, adapter: dspy.Adapter | None) -> dspy.Module:
    """A copy of `student` that answers on the teacher: its LM on every predictor, and its own adapter (a
    hosted teacher takes no llama.cpp grammar). Same class, same predictor names, as BootstrapFinetune
    requires of a teacher; what its traces teach is formatted with the student's adapter."""
    base = type(student)

    class Taught(base):
        def forward(self, **kwargs):
            with dspy.context(adapter=adapter or dspy.settings.adapter):
                return base.forward(self, **kwargs)

    Taught.__name__ = Taught.__qualname__ = base.__name__
    teacher = student.deepcopy()
    teacher.set_lm(lm)
    teacher.__class__ = Taught
    return teacher


def finetune_provider(opt_cfg, lm_cfg, cache_dir: Path):
    """The LoRA provider for `optimizer.finetune`, checked before any LM starts."""
    from pipelines.errors import LMServerError
    from pipelines.finetune.provider import LoRAProvider
    from pipelines.finetune.train import LoRASettings
    from pipelines.server import resolve_gguf

    if not lm_cfg.get("server"):
        raise ConfigError(f"optimizer={opt_cfg.name} trains the embedded model's weights and serves them with "
                          "llama.cpp: use lm=local (an lm with lm.server)")
    settings = OmegaConf.to_container(opt_cfg.finetune, resolve=True)
    try:
        base = Path(settings.get("base_model") or resolve_gguf(lm_cfg.server.gguf)).expanduser()
    except LMServerError as e:
        raise ConfigError(str(e)) from None
    if not base.exists():
        raise ConfigError(f"optimizer.finetune.base_model={base}: no such file or directory")
    return LoRAProvider(base=base, cache_dir=cache_dir, settings=LoRASettings.from_kwargs(settings))


def check_optimizer(cfg, train_size: int) -> None:
    """Everything about an optimize step's config that can be wrong, found before any LM starts: a program
    it cannot compile, a teacher it cannot learn from (or without its key), a GEPA budget or reflection LM
    that cannot work, a finetune without the embedded model."""
    if cfg.program.name == ProgramName.ensemble:
        raise ConfigError("optimize compiles cot, rag or multihop; an ensemble is made of compiled programs: "
                          "program=ensemble ensemble.candidates_of=<an optimize run's id>")
    teacher_cfg = merged_teacher_cfg(cfg)
    if teacher_cfg is not None:
        if teaching(cfg.optimizer) is None:
            raise ConfigError(f"optimizer={cfg.optimizer.name} learns from no teacher; optimizer.teacher applies to "
                              "the optimizers that bootstrap demos or transcripts (mipro, bootstrap, finetune)")
        check_credentials(teacher_cfg)
    if reflective(cfg.optimizer):
        check_reflection(cfg, train_size)
    if cfg.optimizer.get("finetune"):
        finetune_provider(cfg.optimizer, cfg.lm, Path(cfg.paths.cache) / "adapters")


def kept_candidates(opt_cfg) -> int:
    """How many of its best scored candidate programs an optimize run keeps (an ensemble is made of them)."""
    return int(opt_cfg.get("keep_candidates", DEFAULT_KEEP_CANDIDATES))


def compile_kwargs(opt_cfg) -> dict[str, Any]:
    return OmegaConf.to_container(opt_cfg.compile, resolve=True) if opt_cfg.get("compile") else {}


def teaching(opt_cfg) -> str | None:
    """How the optimizer takes a teacher: `settings` (its demos bootstrapped under `teacher_settings`:
    MIPROv2, BootstrapFewShot), `program` (a teacher program passed to `compile`: BootstrapFinetune), or
    None (GEPA and others learn from no teacher)."""
    import inspect

    from hydra.utils import get_class

    target = get_class(opt_cfg._target_)
    if "teacher_settings" in inspect.signature(target).parameters:
        return "settings"
    if issubclass(target, (dspy.BootstrapFinetune, dspy.BetterTogether)):
        return "program"
    return None


def nested(opt_cfg) -> dict[str, Any]:
    """The optimizers a meta-optimizer (BetterTogether) runs, by the name its strategy calls them: keys
    of the preset that are themselves optimizer configs (`p: {_target_: dspy.BootstrapFewShot, ...}`),
    resolved and named, as `build_optimizer` takes a preset."""
    return {key: OmegaConf.create({"name": key, **OmegaConf.to_container(value, resolve=True)})
            for key, value in opt_cfg.items()
            if key not in OWN_KEYS and OmegaConf.is_dict(value) and "_target_" in value}


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
