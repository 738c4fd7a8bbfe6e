"""Shared helpers for the benchmark scripts: import paths, scratch dirs, fake-LM overrides, tables."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
SCRATCH = Path(os.environ.get("BENCH_SCRATCH") or Path(tempfile.gettempdir()) / "ragqa-bench")
VENV_BIN = Path(sys.executable).parent
EXPERIMENT = "ragqa-arena-tech"


def scratch(name: str) -> Path:
    """A fresh directory $BENCH_SCRATCH/bench-NAME-XXXX (default under the system temp dir) for stores
    and caches, never inside the repo."""
    SCRATCH.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"bench-{name}-", dir=SCRATCH))


# Set by `team_server()`: the benchmark's runs go to that MLflow server instead of a temp sqlite store.
SERVER_URI = "BENCH_TRACKING_SERVER"


def fake_overrides(api_base: str, artifacts: Path, *extra: str) -> list[str]:
    """Point the project at the fake LM server, uncached, schema-constrained, no retries."""
    from helpers import fake_lm_overrides

    tracking = ["tracking=server"] if os.environ.get(SERVER_URI) else [f"tracking.artifact_location={artifacts}"]
    return [*fake_lm_overrides(api_base, model="openai/fake-bench"), *tracking, *extra]


@contextlib.contextmanager
def team_server(data_dir: Path):
    """`python -m deploy.team_server serve` (PostgreSQL + basic-auth MLflow) on a free loopback port; this
    process and its children log to it as its admin."""
    import secrets
    import subprocess

    from helpers import free_port

    port = free_port()
    password = secrets.token_urlsafe(16)
    env = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": password, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    log = open(data_dir / "team-server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "deploy.team_server", "serve", "--data-dir", str(data_dir),
                               "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while "Ctrl-C stops it" not in (data_dir / "team-server.log").read_text():
            if server.poll() is not None:
                raise SystemExit(f"the team server exited; see {data_dir / 'team-server.log'}")
            time.sleep(0.5)
        os.environ.update({SERVER_URI: f"http://127.0.0.1:{port}", "MLFLOW_TRACKING_USERNAME": "admin",
                           "MLFLOW_TRACKING_PASSWORD": password})
        yield os.environ[SERVER_URI]
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def isolate_mlflow(store: Path) -> None:
    """Temp tracking store (or the team server) and caches, and no run inherited from an outer `mlflow run`."""
    os.environ["MLFLOW_TRACKING_URI"] = os.environ.get(SERVER_URI) or f"sqlite:///{store}/mlflow.db"
    os.environ["RAGQA_CACHE_DIR"] = str(store / "cache")
    os.environ.pop("MLFLOW_RUN_ID", None)
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


def create_experiment(store: Path, name: str = EXPERIMENT) -> None:
    """Create the experiment with its artifacts in the store: `mlflow run --experiment-name` would
    otherwise create it with artifacts under the working directory (the repo)."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db").create_experiment(
        name, artifact_location=(store / "artifacts").as_uri())


def mlflow_run_env(store: Path, **extra: str) -> dict[str, str]:
    """Environment of an `mlflow run --env-manager local` job on the store's tracking URI and caches:
    the venv first on PATH (MLproject commands call `python`), no run inherited from an outer one."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", MLFLOW_TRACKING_URI=f"sqlite:///{store}/mlflow.db",
               RAGQA_CACHE_DIR=str(store / "cache"), PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def log_time(path: Path, text: str) -> float | None:
    """Epoch time of the first Hydra log line containing `text` ("[%Y-%m-%d %H:%M:%S,%f][...")."""
    if not path.exists():
        return None
    for line in path.read_text(errors="replace").splitlines():
        if text in line and line.startswith("["):
            stamp = line[1:line.index("]")]
            seconds, millis = stamp.split(",")
            return time.mktime(time.strptime(seconds, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000
    return None


def machine() -> str:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load avg at end {load}")


def median(values) -> float:
    return statistics.median(values)


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (also readable on a terminal)."""
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _serve_fake(conn, latency: float, mode: str, options: dict) -> None:
    from fake_lm import FakeLM

    with FakeLM(latency=latency, mode=mode, **options) as fake:
        conn.send(fake.api_base)
        while conn.recv() != "stop":  # any other message asks for the call counters
            conn.send((fake.calls, fake.embedding_calls))


class FakeLMProcess:
    """tests/fake_lm.py FakeLM in its own process, so the server's Python work does not compete
    with the benchmarked client for the GIL. `options` go to FakeLM (score, demo_score, ...);
    `calls` and `embedding_calls` read the server's counters of chat and embedding requests."""

    def __init__(self, latency: float, mode: str = "ok", **options):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve_fake, args=(child, latency, mode, options), daemon=True)
        self._proc.start()
        self.api_base = self._conn.recv()

    def counts(self) -> tuple[int, int]:
        """(chat completions, embedding requests) served so far."""
        self._conn.send("counts")
        return self._conn.recv()

    @property
    def calls(self) -> int:
        return self.counts()[0]

    @property
    def embedding_calls(self) -> int:
        return self.counts()[1]

    def stop(self) -> None:
        self._conn.send("stop")
        self._proc.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
