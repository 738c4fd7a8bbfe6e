"""Turns a step function into a Hydra entry point with one-line errors for bad input."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

from pipelines.config import CONFIG_DIR, ConfigError
from pipelines.server import LMServerError
from pipelines.tracking import TrackingServerError


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
            sys.exit(1)
        evaluation = getattr(result, "result", None)
        if evaluation is None:
            return None
        print(f"{config_name}: {evaluation.headline()}  (run {result.run_id})")
        return evaluation.score

    return _main
