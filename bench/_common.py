"""Shared helpers for the benchmark scripts: import paths, scratch dirs, fake-LM overrides, tables."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
SCRATCH = Path(os.environ.get("BENCH_SCRATCH", "/work/scratch"))


def scratch(name: str) -> Path:
    """A fresh directory /work/scratch/bench-NAME-XXXX for stores and caches (never inside the repo)."""
    SCRATCH.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"bench-{name}-", dir=SCRATCH))


def fake_overrides(api_base: str, artifacts: Path, *extra: str) -> list[str]:
    """Point the project at the fake LM server, uncached, schema-constrained, no retries."""
    from helpers import fake_lm_overrides

    return [*fake_lm_overrides(api_base, model="openai/fake-bench"), f"tracking.artifact_location={artifacts}", *extra]


def isolate_mlflow(store: Path) -> None:
    """Temp tracking store and caches, and no run inherited from an outer `mlflow run`."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"
    os.environ["RAGQA_CACHE_DIR"] = str(store / "cache")
    os.environ.pop("MLFLOW_RUN_ID", None)
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


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


def _serve_fake(conn, latency: float, mode: str) -> None:
    from fake_lm import FakeLM

    with FakeLM(latency=latency, mode=mode) as fake:
        conn.send(fake.api_base)
        while conn.recv() != "stop":  # any other message asks for the call count
            conn.send(fake.calls)


class FakeLMProcess:
    """tests/fake_lm.py FakeLM in its own process, so the server's Python work does not compete
    with the benchmarked client for the GIL. `calls` reads the server's FakeLM.calls counter."""

    def __init__(self, latency: float, mode: str = "ok"):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve_fake, args=(child, latency, mode), daemon=True)
        self._proc.start()
        self.api_base = self._conn.recv()

    @property
    def calls(self) -> int:
        self._conn.send("calls")
        return self._conn.recv()

    def stop(self) -> None:
        self._conn.send("stop")
        self._proc.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
