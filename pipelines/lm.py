"""Language models from config: `dspy.LM` with the embedded server behind it, and the adapters.

An `lm=local` model starts (or finds) the embedded llama.cpp server (pipelines/server.py) on first use.
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
from pathlib import Path
from typing import Any

import dspy
from dspy.adapters.utils import serialize_for_json
from dspy.utils.callback import with_callbacks
from pydantic import TypeAdapter

from pipelines.config import NO_KEY, require_env
from pipelines.errors import ConfigError, LMServerError
from pipelines.evaluation import meter
from pipelines.finetune import adapters
from pipelines.schema import Adapter, LMConfig
from pipelines.server import ensure_server, healthy

log = logging.getLogger(__name__)

# Fewest characters a token of generated English/JSON carries; sizes string bounds from max_tokens.
CHARS_PER_TOKEN_FLOOR = 2.5


_verified: set[str] = set()
_verify_lock = threading.Lock()


class ProjectLM(dspy.LM):
    """`dspy.LM` that makes sure its embedded server is up before the first call in a process.

    Only server *settings* are logged with a program, never a key or a live process, so a
    program loaded in a fresh process starts (or finds) its server on first use.
    """

    def __init__(self, model: str, server: dict[str, Any] | None = None, **kwargs):
        super().__init__(model, **kwargs)
        self.server = server

    def ensure_ready(self) -> None:
        """Start or find the embedded server once per process; later calls trust it."""
        if not self.server:
            return
        with _verify_lock:
            base = self.kwargs.get("api_base")
            if base in _verified:
                return
            if not healthy(base):
                self.kwargs["api_base"] = ensure_server(self.server)
            _verified.add(self.kwargs["api_base"])

    def __call__(self, *args, **kwargs):
        self.ensure_ready()
        return super().__call__(*args, **kwargs)

    async def acall(self, *args, **kwargs):
        self.ensure_ready()
        return await super().acall(*args, **kwargs)

    def copy(self, **kwargs):
        copied = super().copy(**kwargs)
        # DSPy names a finetuned LM by copying the student's with the model its provider returned: served
        # with that model's LoRA adapter, by a server of its own (the base model's has no adapter).
        adapter = getattr(getattr(self, "provider", None), "adapter_for", lambda model: None)(copied.model)
        if adapter is not None and copied.server:
            copied.server = {**copied.server, "lora": str(adapter)}
            copied.kwargs.pop("api_base", None)
        return copied

    def __getstate__(self):
        # A finetuned LM travels with its LoRA adapter's bytes (MLflow's dspy flavor pickles the LM), so it
        # loads on a machine that never saw the file.
        state = super().__getstate__()
        lora = (self.server or {}).get("lora")
        if lora:
            state["lora_bytes"] = Path(lora).read_bytes()
        return state

    def __setstate__(self, state):
        data = state.pop("lora_bytes", None)
        super().__setstate__(state)
        if data is not None:
            self.server = {**self.server, "lora": str(adapters.store(data))}

    def _process_completion(self, response, merged_kwargs):
        # A LiteLLM response passes here before DSPy caches it: its token counts are kept for cache hits.
        meter.keep_usage(response)
        return super()._process_completion(response, merged_kwargs)

    def update_history(self, entry):
        # Every call, fresh or from the cache, on either of DSPy's engines, is recorded here once.
        meter.record(entry)
        return super().update_history(entry)


def output_schema(signature: type[dspy.Signature], max_field_chars: int | None,
                  max_tokens: int | None = None) -> dict[str, Any]:
    """JSON schema of a signature's output fields, in order, with string lengths bounded.

    The upper bound matters: a grammar-constrained small model can ramble inside a string until
    `max_tokens` cuts the JSON, which then fails to parse. So the strings share the token budget.
    The lower bound of 1 keeps a 135M model from taking the shortest valid JSON, `""` everywhere.
    """
    schemas = {name: TypeAdapter(f.annotation).json_schema() for name, f in signature.output_fields.items()}
    strings = [s for s in schemas.values() if s.get("type") == "string"]
    limit = max_field_chars
    if max_tokens and strings:
        share = int(max_tokens * CHARS_PER_TOKEN_FLOOR / len(strings))
        limit = min(limit, share) if limit else share
    for schema in strings:
        schema["minLength"] = 1
        if limit:
            schema["maxLength"] = int(limit)
    return {"type": "object", "properties": schemas, "required": list(schemas)}


def traced_once(cls: type[dspy.Adapter]) -> type[dspy.Adapter]:
    """DSPy wraps `format` and `parse` in its callbacks once per subclass level, so a call on a subclass
    of a subclass runs through nested copies of the wrapper and autolog records a span for each (three
    `format` spans and two `parse` spans per LM call, each with the whole prompt). Wrap the innermost
    method once."""
    for name in ("format", "parse"):
        setattr(cls, name, with_callbacks(inspect.unwrap(getattr(cls, name))))
    return cls


@traced_once
class JSONAdapter(dspy.JSONAdapter):
    """DSPy's JSONAdapter, traced once per call, which also writes finetuning transcripts (DSPy's does not):
    the prompt it sends, then the output fields as the one JSON object a constrained decoder answers with."""

    def format_finetune_data(self, signature, demos, inputs, outputs) -> dict[str, list[dict[str, Any]]]:
        messages = self.format(signature=signature, demos=demos, inputs=inputs)
        answer = {name: outputs.get(name) for name in signature.output_fields}
        content = json.dumps(serialize_for_json(answer), ensure_ascii=False)
        return {"messages": [*messages, {"role": "assistant", "content": content}]}


@traced_once
class SchemaJSONAdapter(JSONAdapter):
    """JSONAdapter whose decoding is constrained to the output-field schema.

    llama-cpp-python takes `{"type": "json_object", "schema": ...}` and compiles it to a grammar; with it
    even a 135M model yields fields that Predict, ChainOfThought and SemanticF1 can parse.
    """

    def __init__(self, max_field_chars: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.max_field_chars = max_field_chars

    def _prepare_response_format(self, lm, lm_kwargs, signature):
        max_tokens = lm_kwargs.get("max_tokens") or lm.kwargs.get("max_tokens")
        schema = output_schema(signature, self.max_field_chars, max_tokens)
        lm_kwargs["response_format"] = {"type": "json_object", "schema": schema}


def build_adapter(lm_cfg: LMConfig) -> dspy.Adapter:
    kind = Adapter(lm_cfg.adapter)  # also a plain string: a logged program's spec
    if kind is Adapter.json_schema:
        return SchemaJSONAdapter(max_field_chars=lm_cfg.max_field_chars)
    return JSONAdapter() if kind is Adapter.json else dspy.ChatAdapter()  # ChatAdapter is wrapped once already


def check_credentials(lm_cfg: LMConfig) -> None:
    require_env(lm_cfg.api_key_env, f"lm.model={lm_cfg.model}")


def build_lm(lm_cfg: LMConfig) -> ProjectLM:
    """A `ProjectLM` from an `lm/` config. Keys are left to LiteLLM, which reads them from the env."""
    check_credentials(lm_cfg)
    kwargs: dict[str, Any] = {"temperature": lm_cfg.temperature, "max_tokens": lm_cfg.max_tokens,
                              "cache": lm_cfg.cache, "num_retries": lm_cfg.num_retries}
    # A plain dict: the LM is pickled with it and starts the server again wherever it is loaded.
    server = dict(lm_cfg.server) if lm_cfg.server else None
    if lm_cfg.api_base:
        kwargs["api_base"] = lm_cfg.api_base
    if (server or lm_cfg.api_base) and not lm_cfg.api_key_env:
        kwargs["api_key"] = NO_KEY
    if lm_cfg.timeout:
        kwargs["timeout"] = lm_cfg.timeout
    return ProjectLM(lm_cfg.model, server=server, **kwargs)


def ensure_reachable(lm: dspy.LM) -> None:
    """Start the embedded server, or check a configured server answers, before any work."""
    if getattr(lm, "server", None):
        lm.ensure_ready()
    elif lm.kwargs.get("api_base") and not healthy(lm.kwargs["api_base"], timeout=10.0):
        raise LMServerError(f"LM server at {lm.kwargs['api_base']} is unreachable (GET /models failed)")


def merged_judge_cfg(cfg):
    """The SemanticF1 judge: the task LM with `judge.*` keys laid over it."""
    return _laid_over_lm(cfg, cfg.get("judge"), "judge")


def merged_reflection_cfg(cfg):
    """GEPA's reflection LM: the task LM with `optimizer.reflection_lm.*` keys laid over it."""
    return _laid_over_lm(cfg, cfg.optimizer.get("reflection_lm"), "optimizer.reflection_lm")


def merged_teacher_cfg(cfg):
    """The optimizer's teacher: `optimizer.teacher.*` keys laid over `lm`; None where there is no teacher."""
    overlay = cfg.optimizer.get("teacher")
    return _laid_over_lm(cfg, overlay, "optimizer.teacher") if overlay else None


def _laid_over_lm(cfg, overlay, key: str):
    """`cfg.lm` itself when `overlay` is empty (callers reuse the task LM), else a merged copy."""
    from omegaconf import DictConfig, OmegaConf

    if not overlay:
        return cfg.lm
    if not isinstance(overlay, DictConfig):
        raise ConfigError(f"{key} must be null or keys laid over lm, e.g. {{model: openai/gpt-4o}}; got {overlay!r}")
    return OmegaConf.merge(cfg.lm, overlay)
