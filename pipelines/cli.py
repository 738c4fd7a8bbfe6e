"""Turns a step function into a Hydra entry point with one-line errors for bad input."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig

from pipelines.config import CONFIG_DIR, ConfigError
from pipelines.server import LMServerError
from pipelines.tracking import TrackingServerError


class JobFailed(CompactHydraException):
    """A sweep job's one-line error (Hydra prints a CompactHydraException without a traceback); the
    error itself is its `__cause__`."""


def entry(config_name: str, step: Callable[[DictConfig], object]) -> Callable[[], None]:
    @hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")
    def _main(cfg: DictConfig) -> float | None:
        logging.getLogger("pipelines").setLevel(logging.INFO)
        for noisy in ("LiteLLM", "litellm", "httpx", "LiteLLM Router"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        try:
            result = step(cfg)
        except (ConfigError, LMServerError, TrackingServerError) as e:
            print(f"error: {e}", file=sys.stderr)
            if HydraConfig.get().mode == RunMode.MULTIRUN:
                # A failed sweep job: the other jobs go on, and Hydra reports this one when they are done.
                raise JobFailed(f"error: {e}") from e
            sys.exit(1)
        print(f"{config_name}: {result.headline()}  (run {result.run_id})")
        return result.score

    return _main
