"""Aligned judges in MLflow's registries: each alignment becomes a new version of the experiment's
registered scorer (an MLflow judge made from the aligned instructions and demos, shown on the UI's Judges
page) and of a prompt of the same name, whose `champion` alias moves only when alignment raised held-out
agreement beyond noise, by the rule a program's champion moves by (`promotion.shortfall`). The prompt
version carries the DSPy state the project scores with, so `scoring.judge=NAME` (its champion), `NAME@ALIAS`
or `NAME/VERSION` resolve to it, and runs record `NAME vN`; `aligned_state` brings the state to a local file
for `JudgedF1`."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import dspy
import mlflow

from pipelines.errors import ConfigError
from pipelines.tracking.prompts import plain_text
from pipelines.tracking.registry import CHAMPION

STATE_TAG = "dspy_state"        # the prompt version's tag holding the judge program's state URI
SCORER_VERSION_TAG = "scorer_version"
_REGISTERED = re.compile(r"^(?:prompts:/)?([A-Za-z0-9_.-]+)(?:@([A-Za-z0-9_-]+)|/(\d+))?$")


@dataclass(frozen=True)
class ResolvedJudge:
    state: str      # where the judge program's DSPy state is: a path or an artifact URI
    version: str    # what runs record as the judge that scored them


@dataclass(frozen=True)
class RegisteredJudge:
    name: str
    version: int          # the scorer's version; the prompt version of the same alignment below
    prompt_version: int
    champion: bool


def resolve_judge(ref: str) -> ResolvedJudge:
    """`scoring.judge=`: a path or artifact URI (`runs:/<id>/judge/aligned.json`) is used as it is; a
    registered judge's name (champion), `NAME@ALIAS` or `NAME/VERSION` is looked up in the prompt registry."""
    match = _REGISTERED.match(ref)
    if not match or ref.endswith(".json"):  # a path or an artifact URI
        return ResolvedJudge(ref, ref)
    name, alias, number = match.groups()
    uri = f"prompts:/{name}/{number}" if number else f"prompts:/{name}@{alias or CHAMPION}"
    try:
        prompt = mlflow.genai.load_prompt(uri)
    except Exception as e:
        hint = (f"no alignment of {name} has raised held-out agreement beyond doubt yet: name a version, "
                f"scoring.judge={name}/VERSION" if "alias" in str(e).lower() else
                "align one with `mlflow run . -e judge -P overrides=\"align=true\"`")
        raise ConfigError(f"scoring.judge={ref}: no registered judge at {uri} ({' '.join(str(e).split())[:120]}); "
                          f"{hint}") from None
    state = prompt.tags.get(STATE_TAG)
    if not state:
        raise ConfigError(f"scoring.judge={ref}: prompt {prompt.name}/{prompt.version} is not an aligned judge "
                          f"(no {STATE_TAG} tag)")
    return ResolvedJudge(state, f"{prompt.name} v{prompt.tags.get(SCORER_VERSION_TAG, prompt.version)}")


@functools.cache
def aligned_state(ref: str) -> str:
    """A local copy of an aligned judge's state, for `JudgedF1(aligned=...)`: a path is used as it is, an MLflow
    artifact URI (`runs:/<id>/judge/...`, as `resolve_judge` gives) is downloaded, once per process: `main`
    checks every step's config, then each step checks its own again."""
    if Path(ref).is_file():
        return ref
    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=ref)
    except Exception as e:
        raise ConfigError(f"scoring.judge={ref}: no aligned judge there ({' '.join(str(e).split())[:160]})") from None


def judge_instructions(program: dspy.Module, threshold: float) -> str:
    """The aligned judge as one MLflow judge template: its instructions, its demos as worked verdicts, then
    the case to judge (MLflow fills `{{ inputs }}`, `{{ outputs }}`, `{{ expectations }}`)."""
    (predictor,) = [p for _, p in program.named_predictors()]
    parts = [plain_text(predictor.signature.instructions),
             f"Give a score from 0 to 1 (the F1 of precision and recall over key ideas); {threshold:g} or more "
             "means a person would call the response correct."]
    for i, demo in enumerate(predictor.demos, 1):
        fields = "\n".join(f"{k}: {plain_text(v)}" for k, v in demo.items() if not str(k).startswith("augmented"))
        parts.append(f"Worked verdict {i} (as a person judged it):\n{fields}")
    parts.append("Question: {{ inputs }}\nGold answer: {{ expectations }}\nResponse to judge: {{ outputs }}")
    return "\n\n".join(parts)


def judge_model(lm_model: str) -> str:
    """DSPy's `provider/model` as MLflow's judge model URI, `provider:/model`."""
    provider, _, model = lm_model.partition("/")
    return f"{provider}:/{model}" if model else f"openai:/{provider}"


def register_judge(program: dspy.Module, *, name: str, state: str, lm_model: str, threshold: float,
                   improved: bool) -> RegisteredJudge:
    """A new version of the experiment's scorer `name` (the Judges page) and of the prompt `name`, tagged
    with the judge program's state; the prompt's `champion` alias moves only when `improved` (the caller
    applies `promotion.shortfall` to the held-out gain)."""
    from mlflow.genai.judges import make_judge

    run = mlflow.active_run()
    instructions = judge_instructions(program, threshold)
    judge = make_judge(name=name, instructions=instructions, model=judge_model(lm_model), feedback_value_type=float,
                       description=f"SemanticF1 aligned with people's labels in run {run.info.run_id}")
    scorer = judge.register(name=name, experiment_id=run.info.experiment_id)
    version = scorer.scorer_version
    prompt = mlflow.genai.register_prompt(
        name=name, template=instructions, commit_message=f"aligned in run {run.info.run_id}",
        tags={STATE_TAG: state, SCORER_VERSION_TAG: str(version), "run_id": run.info.run_id,
              "threshold": f"{threshold:g}"})
    if improved:
        mlflow.genai.set_prompt_alias(name, CHAMPION, prompt.version)
    mlflow.set_tags({"registered_judge": f"{name} v{version}", "judge_prompt": f"{name}/{prompt.version}"})
    return RegisteredJudge(name, version, int(prompt.version), improved)
