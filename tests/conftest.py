"""Shared fixtures: a throwaway MLflow store and cache per test, the embedded server per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dspy
import mlflow
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from pipelines.config import compose  # noqa: E402

FAKE_KEY = "sk-fake-0123456789-DO-NOT-LEAK"


def pytest_configure(config):
    config.addinivalue_line("markers", "lm: needs the embedded llama.cpp server (real SmolLM2 calls)")
    config.addinivalue_line("markers", "e2e: runs an entry point end to end through `mlflow run`")


@pytest.fixture(autouse=True)
def isolated_globals():
    """Undo what a job does to process-wide state (env vars, DSPy settings, autolog, active model) after each test."""
    environ = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(environ)
    dspy.configure(lm=None, adapter=None)
    mlflow.dspy.autolog(disable=True)
    mlflow.clear_active_model()  # loading a model makes it the active one, in a store that is gone


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty sqlite store, artifact root and caches under tmp_path."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("RAGQA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    # Forget the experiment chosen against the previous test's store.
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    yield tmp_path
    while mlflow.active_run():
        mlflow.end_run()


def smoke(name: str, store_path: Path, *overrides: str):
    """The smoke preset of an entry point's config, with artifacts inside the test's store."""
    return compose(name, ["experiment=smoke", f"tracking.artifact_location={store_path}/artifacts", *overrides])


@pytest.fixture(scope="session")
def local_server():
    """Start (or reuse) the embedded server once; `mlflow run` subprocesses find it via its state file."""
    from pipelines.lm import ensure_server

    cfg = compose("config")
    return ensure_server(dict(cfg.lm.server))


MLFLOW = str(Path(sys.executable).parent / "mlflow")


def user_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a user whose venv is active (entry points run `python -m`, serving runs uvicorn)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, **(env or {})}


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 1800):
    """Run a command the way a user would; returns the CompletedProcess (output captured)."""
    return subprocess.run(args, cwd=cwd, env=user_env(env), capture_output=True, text=True, timeout=timeout)


def mlflow_run(entry: str, store_path: Path, overrides: str = "experiment=smoke", extra: list[str] = (),
               env: dict[str, str] | None = None):
    """`mlflow run ROOT -e ENTRY --env-manager local -P overrides=...` against the test's store."""
    args = [MLFLOW, "run", str(ROOT), "-e", entry, "--env-manager", "local",
            "-P", f"overrides={overrides}", *extra]
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store_path}/mlflow.db",
           "RAGQA_CACHE_DIR": str(store_path / "cache"), **(env or {})}
    return run_cli(args, cwd=store_path, env=env)
