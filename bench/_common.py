"""What the benchmark scripts share: scratch dirs, stores, the servers they run against, worker processes, jobs,
the runs' own phase timings, tables. MLflow is imported only where used: some benchmarks measure without it."""
# ruff: noqa: E402 (the project and tests/ are importable once ROOT is on the path)

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median  # noqa: F401 (for the scripts)

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import dspy

from pipelines.config import compose
from pipelines.evaluation.judge import JudgedF1
from pipelines.evaluation.scoring import Scorer, Scoring
from pipelines.lm import build_adapter, build_lm
from pipelines.server import ensure_server

from fake_lm import FakeLM
from helpers import fake_lm_overrides, free_port, start_team_server

SCRATCH = Path(os.environ.get("BENCH_SCRATCH") or Path(tempfile.gettempdir()) / "ragqa-bench")
EXPERIMENT = "ragqa-arena-tech"
SERVER_URI = "BENCH_TRACKING_SERVER"  # set by `team_server()`: runs go there instead of a temp sqlite store
HELP = {"latency": "the fake LM's seconds per chat request", "server": "log to a team server (deploy/team_server.py)",
        "cached": "answer every LM call from DSPy's cache"}


def scratch(name: str) -> Path:
    """A fresh directory $BENCH_SCRATCH/bench-NAME-XXXX (default under the system temp dir), never in the repo."""
    SCRATCH.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"bench-{name}-", dir=SCRATCH))


def parser(doc: str, **options) -> argparse.ArgumentParser:
    """The script's parser, its docstring as help, with an --OPTION per keyword, typed by its default (bool: a flag)."""
    cli = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in options.items():
        typed = {"action": "store_true"} if isinstance(default, bool) else {"type": type(default), "default": default}
        cli.add_argument(f"--{name}", help=HELP.get(name), **typed)
    return cli


def run_script(cli: argparse.ArgumentParser, main, worker=None) -> None:
    """`main(args)`; or, in a process `spawn_worker` started, `worker(args)` with its result printed as JSON."""
    cli.add_argument("--worker-args", help=argparse.SUPPRESS)
    args = cli.parse_args()
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


def fake_overrides(api_base: str, artifacts: Path, *extra: str, fake: bool = True) -> list[str]:
    """The project's LM at the fake LM server (schema-constrained, no retries), or with `fake=False` at an embedded
    server already running, uncached; runs to the team server if there is one, else artifacts in `artifacts`."""
    lm = fake_lm_overrides(api_base) if fake else [f"lm.api_base={api_base}", "lm.cache=false"]
    tracking = ["tracking=server"] if os.environ.get(SERVER_URI) else [f"tracking.artifact_location={artifacts}"]
    return [*lm, *tracking, *extra]


def cot_judged(api_base: str, store: Path, *extra: str, trace_judge: bool = False):
    """What trace_cost and concurrency evaluate, DSPy configured for it: the cot program (1 LM call per example)
    and the project's default metrics with its SemanticF1 judge (1 call), on the fake LM. (cfg, program, metric)"""
    cfg = compose("cot", fake_overrides(api_base, store / "artifacts", *extra))
    lm = build_lm(cfg.lm)
    dspy.configure(lm=lm, adapter=build_adapter(cfg.lm))
    metric = Scorer(Scoring.from_cfg(cfg.scoring), JudgedF1(lm, traced=trace_judge))
    return cfg, dspy.ChainOfThought("question -> response"), metric


def examples(n: int):
    """`n` made-up technical questions with reference answers."""
    topics = ["git rebase", "ssh keys", "python venvs", "docker volumes", "bash loops", "regex lookahead",
              "nginx proxies", "SQL joins"]
    return [dspy.Example(question=f"how do I use {topics[i % len(topics)]} (case {i})?",
                         response=f"Use {topics[i % len(topics)]} like this: step one, step two, step three. "
                                  f"Check the manual for the edge cases of case {i}.").with_inputs("question")
            for i in range(n)]


def sqlite_uri(store: Path) -> str:
    return f"sqlite:///{store}/mlflow.db"


def isolate_mlflow(store: Path) -> None:
    """Temp tracking store (or the team server) and caches, and no run inherited from an outer `mlflow run`."""
    os.environ["MLFLOW_TRACKING_URI"] = os.environ.get(SERVER_URI) or sqlite_uri(store)
    os.environ["RAGQA_CACHE_DIR"] = str(store / "cache")
    for inherited in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        os.environ.pop(inherited, None)


@contextlib.contextmanager
def team_server(data_dir: Path):
    """`python -m deploy.team_server serve` (PostgreSQL + basic-auth MLflow) on a free loopback port; this
    process and its children log to it as its admin."""
    port, password = free_port(), secrets.token_urlsafe(16)
    server = start_team_server(data_dir, port, password, data_dir / "team-server.log")
    os.environ.update({SERVER_URI: f"http://127.0.0.1:{port}", "MLFLOW_TRACKING_USERNAME": "admin",
                       "MLFLOW_TRACKING_PASSWORD": password})
    try:
        yield os.environ[SERVER_URI]
    finally:
        server.terminate()
        server.wait(timeout=60)


def private_server(state_dir: Path) -> str:
    """The embedded llama.cpp server (lm=local) with its own state dir; this process is its only user, so its
    watchdog stops it once this process has ended. Its api_base."""
    return ensure_server({**compose("config").lm.server, "state_dir": str(state_dir)})


def _serve_fake(conn, options: dict) -> None:
    with FakeLM(**options) as fake:
        conn.send(fake.api_base)
        while conn.recv() != "stop":  # any other message asks for the call counters
            conn.send((fake.calls, fake.embedding_calls))


@contextlib.contextmanager
def fake_lm(**options):
    """tests/fake_lm.py's FakeLM (`options` go to it) in a process of its own, so its Python work does not take
    the benchmarked client's GIL. Yields its api_base and `counts()`: chat and embedding requests served so far."""
    conn, child = multiprocessing.Pipe()
    server = multiprocessing.get_context("spawn").Process(target=_serve_fake, args=(child, options), daemon=True)
    server.start()
    child.close()  # a server that dies ends recv()

    def counts() -> tuple[int, int]:
        conn.send("counts")
        return conn.recv()
    try:
        yield conn.recv(), counts
    finally:
        conn.send("stop")
        server.join(timeout=10)


def phase_times(run) -> dict[str, float]:
    """A run's own phase timings (s): its `time_<phase>_s` metrics (index: built or loaded before the run opens),
    `run` (start to end) and `other` (the run's time in none of them: config, datasets, results, trace export)."""
    phases = {k[5:-2]: v for k, v in run.data.metrics.items() if k.startswith("time_") and k.endswith("_s")}
    if run.info.end_time:
        phases["run"] = (run.info.end_time - run.info.start_time) / 1000
        phases["other"] = phases["run"] - sum(v for k, v in phases.items() if k not in ("index", "run"))
    return phases


def machine() -> str:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load avg at end {load}")


def timed(fn, *args, **kwargs):
    """(fn(*args, **kwargs), its wall time in seconds)"""
    t = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - t


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (also readable on a terminal)."""
    cells = [headers, *([f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in rows)]
    return "\n".join(["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(headers)]
                     + ["| " + " | ".join(row) + " |" for row in cells[1:]])
