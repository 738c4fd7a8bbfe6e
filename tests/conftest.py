"""Shared fixtures: a throwaway MLflow store and cache per test, the embedded server per session."""

from __future__ import annotations

import os

import dspy
import mlflow
import pytest

from pipelines.config import compose


def pytest_configure(config):
    config.addinivalue_line("markers", "lm: needs the embedded llama.cpp server (real SmolLM2 calls)")
    config.addinivalue_line("markers", "e2e: runs an entry point end to end through `mlflow run`")
    config.addinivalue_line("markers", "server: starts the team server (PostgreSQL + mlflow server with basic-auth)")


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


@pytest.fixture(scope="session")
def local_server():
    """Start (or reuse) the embedded server once; `mlflow run` subprocesses find it via its state file."""
    from pipelines.server import ensure_server

    cfg = compose("config")
    return ensure_server(dict(cfg.lm.server))
