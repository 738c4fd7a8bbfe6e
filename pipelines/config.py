"""Config helpers shared by every entry point: resolvers, composition, flattening, redaction."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipelines import schema
from pipelines.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "conf"

# A placeholder for servers that want no key; real keys only ever come from the environment.
NO_KEY = "no-key"

# Keys whose values are never logged, whatever their nesting.
_SECRET_MARKERS = ("api_key", "token", "secret", "password")

schema.register()

if not OmegaConf.has_resolver("project_root"):
    # Paths in conf/ are anchored here so `data=` works from any working directory.
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))


def compose(config_name: str = "config", overrides: Iterable[str] = ()) -> DictConfig:
    """Compose a config outside `@hydra.main` (tests, `main` composing its children)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides)
    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name=config_name, overrides=overrides)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def is_secret(key: str) -> bool:
    key = key.lower()
    return any(marker in key for marker in _SECRET_MARKERS) and not key.endswith("_env")


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Resolved plain dict with secret-looking keys removed."""
    return _redact(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items() if not is_secret(str(k))}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"lm": {"model": "x"}}` -> `{"lm.model": "x"}` for MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def require_env(name: str | None, why: str) -> None:
    """Fail before any work when a needed environment variable is missing."""
    if name and not os.environ.get(name):
        raise ConfigError(f"{why} needs the environment variable {name}; set it (export {name}=...) and retry.")


