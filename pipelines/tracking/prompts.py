"""Learned prompts in MLflow's prompt registry: one prompt per registered model and predictor, whose
`champion` alias follows the program's."""

from __future__ import annotations

import re

import dspy
import mlflow
from mlflow.entities.model_registry import PromptVersion

from pipelines.tracking.registry import CHAMPION


def prompt_name(registered_model: str, predictor: str) -> str:
    """`<registered model>.<predictor>`, with characters MLflow's prompt names refuse made `-`."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{registered_model}.{predictor}")


def plain_text(text: str) -> str:
    """Text that MLflow will not read as a template: `{{ x }}` would become a variable, `{% %}` Jinja."""
    return str(text).replace("{{", "{ {").replace("{%", "{ %")


def prompt_messages(predictor: dspy.Predict) -> list[dict[str, str]]:
    """The predictor as chat messages: its instructions as the system message, each demo as a user
    turn (its input fields) and an assistant turn (its output fields), as DSPy's adapters send them."""
    signature = predictor.signature
    messages = [{"role": "system", "content": signature.instructions}]
    for demo in predictor.demos:
        messages += [{"role": "user", "content": _demo_fields(demo, signature.input_fields)},
                     {"role": "assistant", "content": _demo_fields(demo, signature.output_fields)}]
    return messages


def _demo_fields(demo, names) -> str:
    def text(value) -> str:
        return "\n".join(map(str, value)) if isinstance(value, list) else str(value)

    return "\n\n".join(f"{name}: {text(demo[name])}" for name in names if demo.get(name) is not None)


def register_prompts(program: dspy.Module, *, registered_model: str, variant: str) -> list[PromptVersion]:
    """One new prompt version per predictor of `program`, tagged with the run that learned it."""
    run_id = mlflow.active_run().info.run_id
    versions = []
    for predictor_name, predictor in program.named_predictors():
        messages = prompt_messages(predictor)
        template = [{**m, "content": plain_text(m["content"])} for m in messages]
        versions.append(mlflow.genai.register_prompt(
            name=prompt_name(registered_model, predictor_name), template=template,
            commit_message=f"{variant}: instructions and {len(predictor.demos)} demos of {predictor_name}",
            tags={"registered_model": registered_model, "predictor": predictor_name, "variant": variant,
                  "run_id": run_id, "demos": str(len(predictor.demos)),
                  "braces_escaped": str(template != messages).lower()}))
    return versions


def link_prompts(prompts: list[PromptVersion], *, registered_model: str, version: str, promoted: bool) -> None:
    """Tag each prompt version with its model version; when that became champion, move the prompts'
    `champion` alias to these versions and off this model's prompts that the new champion lacks."""
    for prompt in prompts:
        mlflow.genai.set_prompt_version_tag(prompt.name, prompt.version, "model_version", str(version))
    mlflow.set_tag("prompts", ", ".join(f"{p.name}/{p.version}" for p in prompts))
    if not promoted:
        return
    current = {p.name for p in prompts}
    prefix = prompt_name(registered_model, "")
    for other in mlflow.genai.search_prompts(filter_string=f"name LIKE '{prefix}%'"):
        if other.name.startswith(prefix) and other.name not in current:
            mlflow.genai.delete_prompt_alias(other.name, CHAMPION)
    for prompt in prompts:
        mlflow.genai.set_prompt_alias(prompt.name, CHAMPION, prompt.version)
