"""Test tiers and shared fixtures.

Every test lives in one tier's folder and carries its marker (`pytest -m unit`):

  unit/         no subprocess, no server, no LM (DSPy's DummyLM at most): the loop before every commit
  integration/  the fake OpenAI-compatible server, PostgreSQL + mlflow server, sweeps, serving, Spark
  e2e/          the real embedded LM through `mlflow run`

The unit tier is guarded: starting a process or listening on a socket there fails the test.
"""

from __future__ import annotations

import _posixsubprocess
import os
import socket
from pathlib import Path

import dspy
import mlflow
import pytest

from pipelines.config import compose

from fake_lm import FakeLM
from helpers import FAKE_KEY

TIERS = ("unit", "integration", "e2e")
HERE = Path(__file__).resolve().parent


def pytest_configure(config):
    config.addinivalue_line("markers", "unit: no subprocess, no server, no LM; minutes in all")
    config.addinivalue_line("markers", "integration: fake LM server, PostgreSQL, mlflow server, sweeps, serve, Spark")
    config.addinivalue_line("markers", "e2e: the real embedded LM through `mlflow run`")


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = Path(item.fspath).resolve().relative_to(HERE).parts[0]
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in one of tests/{{{','.join(TIERS)}}}/")
        item.add_marker(tier)


class ProcessStarted(AssertionError):
    """A unit test tried to start a process or a server."""


@pytest.fixture(autouse=True)
def unit_guard(request, monkeypatch):
    """Unit tests start no process and no server: each way of doing so fails the test here."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return

    def refuse(what):
        def refused(*args, **kwargs):
            raise ProcessStarted(f"a unit test may not {what}; move it to tests/integration/")
        return refused

    monkeypatch.setattr(_posixsubprocess, "fork_exec", refuse("start a process"))  # subprocess, multiprocessing
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp"):
        monkeypatch.setattr(os, name, refuse("start a process"))
    monkeypatch.setattr(socket.socket, "listen", refuse("listen on a socket"))
    yield


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
    monkeypatch.setenv("RAGQA_ADAPTER_DIR", str(tmp_path / "adapters"))  # where a pickled LM puts its adapter
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    # Forget the experiment chosen against the previous test's store.
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    yield tmp_path
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture
def user(store, monkeypatch):
    """A user who has an OpenAI-style key in the environment and has not allowed pickles; the environment
    their own processes get."""
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    monkeypatch.delenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", raising=False)
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db"}


@pytest.fixture(scope="session")
def fake_server():
    """One fake OpenAI-compatible LM and embedding server for the whole session; a test picks its LM's
    behaviour by model name (`fake_lm.fake_model`)."""
    with FakeLM(keep_prompts=True) as fake:
        yield fake


@pytest.fixture
def fake(fake_server):
    """The session's fake server with its call counts and prompts reset for this test."""
    return fake_server.reset()


@pytest.fixture(scope="session")
def local_server():
    """Start (or reuse) the embedded server once; `mlflow run` subprocesses find it via its state file."""
    from pipelines.server import ensure_server

    cfg = compose("config")
    return ensure_server(dict(cfg.lm.server))
