"""What the benchmark scripts share: paths and scratch dirs, stores, the servers they run against (fake LM,
embedded llama.cpp, team server), fresh worker processes, `mlflow run` jobs, the runs' phase timings, tables."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
SCRATCH = Path(os.environ.get("BENCH_SCRATCH") or Path(tempfile.gettempdir()) / "ragqa-bench")
VENV_BIN = Path(sys.executable).parent
EXPERIMENT = "ragqa-arena-tech"
# Set by `team_server()`: the benchmark's runs go to that MLflow server instead of a temp sqlite store.
SERVER_URI = "BENCH_TRACKING_SERVER"


def scratch(name: str) -> Path:
    """A fresh directory $BENCH_SCRATCH/bench-NAME-XXXX (default under the system temp dir) for stores
    and caches, never inside the repo."""
    SCRATCH.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"bench-{name}-", dir=SCRATCH))


def parser(doc: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def run_script(args_parser: argparse.ArgumentParser, main, worker=None) -> None:
    """`main(args)`; or, in a process `spawn_worker` started, `worker(args)` with its result printed as JSON."""
    args_parser.add_argument("--worker-args", help=argparse.SUPPRESS)
    args = args_parser.parse_args()
    if args.worker_args:
        print(json.dumps(worker(argparse.Namespace(**json.loads(args.worker_args)))))
    else:
        main(args)


def spawn_worker(args: argparse.Namespace, **changes) -> dict:
    """Run this script again in a fresh interpreter, as a worker on `args` with `changes`; its JSON result."""
    spec = json.dumps({**vars(args), **changes}, default=str)
    proc = subprocess.run([sys.executable, sys.modules["__main__"].__file__, "--worker-args", spec],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"worker {changes} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fake_overrides(api_base: str, artifacts: Path, *extra: str) -> list[str]:
    """Point the project at the fake LM server, uncached, schema-constrained, no retries."""
    from helpers import fake_lm_overrides

    tracking = ["tracking=server"] if os.environ.get(SERVER_URI) else [f"tracking.artifact_location={artifacts}"]
    return [*fake_lm_overrides(api_base, model="openai/fake-bench"), *tracking, *extra]


def sqlite_uri(store: Path) -> str:
    return f"sqlite:///{store}/mlflow.db"


def isolate_mlflow(store: Path) -> None:
    """Temp tracking store (or the team server) and caches, and no run inherited from an outer `mlflow run`."""
    os.environ["MLFLOW_TRACKING_URI"] = os.environ.get(SERVER_URI) or sqlite_uri(store)
    os.environ["RAGQA_CACHE_DIR"] = str(store / "cache")
    os.environ.pop("MLFLOW_RUN_ID", None)
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


@contextlib.contextmanager
def team_server(data_dir: Path):
    """`python -m deploy.team_server serve` (PostgreSQL + basic-auth MLflow) on a free loopback port; this
    process and its children log to it as its admin."""
    import secrets

    from helpers import free_port, start_team_server

    port, password = free_port(), secrets.token_urlsafe(16)
    server = start_team_server(data_dir, port, password, data_dir / "team-server.log")
    os.environ.update({SERVER_URI: f"http://127.0.0.1:{port}", "MLFLOW_TRACKING_USERNAME": "admin",
                       "MLFLOW_TRACKING_PASSWORD": password})
    try:
        yield os.environ[SERVER_URI]
    finally:
        server.terminate()
        server.wait(timeout=60)


def _serve(conn, kind: str, options: dict) -> None:
    with contextlib.ExitStack() as stack:
        if kind == "fake":
            from fake_lm import FakeLM

            started = time.perf_counter()
            fake = stack.enter_context(FakeLM(**options))
            api_base, counts = fake.api_base, lambda: (fake.calls, fake.embedding_calls)
        else:  # this process registers as the server's only user: its watchdog stops it once we exit
            from pipelines.config import compose
            from pipelines.server import ensure_server

            settings = {**compose("config").lm.server, **options}
            started = time.perf_counter()
            api_base, counts = ensure_server(settings), lambda: (0, 0)
        conn.send((api_base, time.perf_counter() - started))
        while conn.recv() != "stop":  # any other message asks for the call counters
            conn.send(counts())


class ServerProcess:
    """A server in a child process of its own: "fake", tests/fake_lm.py's FakeLM (`options` go to it), so
    its Python work does not take the benchmarked client's GIL; or "local", the embedded llama.cpp server
    with `options` over `lm.server` (give it a private `state_dir`), gone once `stop()` ends the child.
    `counts()`: chat and embedding requests the fake served so far (the embedded server: 0, 0)."""

    def __init__(self, kind: str = "fake", **options):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, kind, options), daemon=True)
        self._proc.start()
        child.close()  # so a child that dies unblocks recv()
        try:
            self.api_base, self.start_seconds = self._conn.recv()
        except EOFError:
            self._proc.join()
            raise SystemExit(f"the {kind} server did not start (exit code {self._proc.exitcode})") from None
        self.state_dir = options.get("state_dir")

    def counts(self) -> tuple[int, int]:
        self._conn.send("counts")
        return self._conn.recv()

    @property
    def calls(self) -> int:
        return self.counts()[0]

    def stop(self) -> None:
        from pipelines.server import running_servers

        self._conn.send("stop")
        self._proc.join(timeout=30)
        deadline = time.monotonic() + 30
        while self.state_dir and running_servers(Path(self.state_dir)) and time.monotonic() < deadline:
            time.sleep(0.2)  # the watchdog's next look finds no user

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def create_experiment(store: Path, name: str = EXPERIMENT) -> None:
    """Create the experiment with its artifacts in the store: `mlflow run --experiment-name` would
    otherwise create it with artifacts under the working directory (the repo)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=sqlite_uri(store))
    client.create_experiment(name, artifact_location=(store / "artifacts").as_uri())


def mlflow_run_env(store: Path, **extra: str) -> dict[str, str]:
    """Environment of an `mlflow run --env-manager local` job on the store's tracking URI and caches:
    the venv first on PATH (MLproject commands call `python`), no run inherited from an outer one."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", MLFLOW_TRACKING_URI=sqlite_uri(store),
               RAGQA_CACHE_DIR=str(store / "cache"), PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def run_job(cmd: list[str], env: dict[str, str], log_path: Path) -> tuple[int, float, float]:
    """Run `cmd` from the repo root, output to `log_path`: (exit code, wall s, peak RSS MiB of the process and
    every descendant it waited for)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return proc.returncode, time.perf_counter() - start, usage.ru_maxrss / 1024


def step_runs(store: Path, since: float = 0, until: float | None = None) -> list:
    """The runs of the store's experiment started between `since` and `until` (epoch s), oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=sqlite_uri(store))
    window = f"attributes.start_time >= {int(since * 1000)}"
    window += f" and attributes.start_time <= {int(until * 1000)}" if until else ""
    return client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id], window,
                              max_results=1000, order_by=["attributes.start_time ASC"])


def phase_times(run) -> dict[str, float]:
    """A run's own phase timings, in seconds: its `time_<phase>_s` metrics (index: load or build before the
    run opens; evaluate, baseline_evaluate, compile, log_model, register: inside it), `run` (its start to
    end) and `other` (the part of the run in none of its phases: config, datasets, results, trace export)."""
    phases = {k[5:-2]: v for k, v in run.data.metrics.items() if k.startswith("time_") and k.endswith("_s")}
    if run.info.end_time:
        phases["run"] = (run.info.end_time - run.info.start_time) / 1000
        phases["other"] = phases["run"] - sum(v for k, v in phases.items() if k not in ("index", "run"))
    return phases


def examples(n: int):
    """`n` made-up technical questions with reference answers."""
    import dspy

    topics = ["git rebase", "ssh keys", "python venvs", "docker volumes", "bash loops", "regex lookahead",
              "nginx proxies", "SQL joins"]
    return [dspy.Example(question=f"how do I use {topics[i % len(topics)]} (case {i})?",
                         response=f"Use {topics[i % len(topics)]} like this: step one, step two, step three. "
                                  f"Check the manual for the edge cases of case {i}.").with_inputs("question")
            for i in range(n)]


def machine() -> str:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   cpu)
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
