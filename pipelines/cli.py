"""Turns a step function into a Hydra entry point with one-line errors for bad input.

The step is named, not imported, so `import pipelines.cli` (and Hydra's own config errors) load no MLflow
or DSPy: the step's module is imported once the config is composed."""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig

from pipelines.config import CONFIG_DIR
from pipelines.errors import ConfigError, LMServerError, TrackingServerError


class JobFailed(CompactHydraException):
    """A sweep job's one-line error (Hydra prints a CompactHydraException without a traceback); the
    error itself is its `__cause__`."""


def step_function(target: str) -> Callable:
    """`pipelines.steps.variant:run_variant` -> that function."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def entry(config_name: str, target: str, *, with_overrides: bool = False) -> Callable[[], None]:
    """A Hydra main for `config_name` that runs the step function `target` (`module:function`) on the
    composed config; `with_overrides` also hands it the command line's overrides (main composes each of
    its steps' configs with them)."""

    @hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")
    def _main(cfg: DictConfig) -> float | None:
        logging.getLogger("pipelines").setLevel(logging.INFO)
        for noisy in ("LiteLLM", "litellm", "httpx", "LiteLLM Router"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        step = step_function(target)
        try:
            result = step(cfg, HydraConfig.get().overrides.task) if with_overrides else step(cfg)
        except (ConfigError, LMServerError, TrackingServerError) as e:
            print(f"error: {e}", file=sys.stderr)
            if HydraConfig.get().mode == RunMode.MULTIRUN:
                # A failed sweep job: the other jobs go on, and Hydra reports this one when they are done.
                raise JobFailed(f"error: {e}") from e
            sys.exit(1)
        print(f"{config_name}: {result.headline()}  (run {result.run_id})")
        return result.score

    return _main
