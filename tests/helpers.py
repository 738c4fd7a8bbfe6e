"""What tests (and bench scripts) share: paths, the fake-LM overrides, composing the smoke preset, running
commands as a user would. Fixtures live in conftest.py."""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dspy
import numpy as np

from pipelines.config import compose
from pipelines.evaluation.result import EvalResult
from pipelines.evaluation.scoring import Scoring

from fake_lm import fake_model, hashed_embedding

ROOT = Path(__file__).resolve().parents[1]
MLFLOW = str(Path(sys.executable).parent / "mlflow")
FAKE_KEY = "sk-fake-0123456789-DO-NOT-LEAK"


def fake_lm_overrides(api_base: str, *, model: str = "openai/fake", adapter: str = "json_schema",
                      threads: int | None = None) -> list[str]:
    """Point the project's LM (and judge) at a fake OpenAI-compatible server: no key, no cache, no retries."""
    overrides = ["lm=openai", f"lm.api_base={api_base}", "lm.api_key_env=null", f"lm.model={model}",
                 "lm.cache=false", f"lm.adapter={adapter}", "lm.num_retries=0"]
    return overrides + ([f"num_threads={threads}"] if threads else [])


def fake_overrides(fake, mode: str = "ok", **behaviour) -> list[str]:
    """LM, judge and embedder at a running FakeLM, the LM answering as `fake_model(mode, **behaviour)`
    asks, on one thread so its answers come in order."""
    return [*fake_lm_overrides(fake.api_base, model=fake_model(mode, **behaviour), threads=1), "embedder=openai",
            f"embedder.api_base={fake.api_base}", "embedder.api_key_env=null"]


@functools.cache  # composing a config takes a moment; a rule's scoring never changes
def promotion_scoring(rule: str = "significant") -> Scoring:
    """The scoring settings of a run whose primary metric is SemanticF1, promoting by `rule`."""
    return Scoring.from_cfg(compose("cot", ["scoring.primary=semantic_f1", f"scoring.promotion={rule}"]).scoring)


def dev_result(scores, rule: str = "significant") -> EvalResult:
    """A dev evaluation with these per-example SemanticF1 scores (0-100; None: the judge gave no verdict), one
    question each."""
    rows = [{"question": f"q{i}", "semantic_f1": None if s is None else float(s), "error": ""}
            for i, s in enumerate(scores)]
    return EvalResult.from_rows(rows, promotion_scoring(rule))


class FixedRetriever:
    """A retriever that returns the first k of fixed passages, with their positions as doc ids."""

    def __init__(self, passages):
        self.passages = passages

    def __call__(self, query, k=None):
        return dspy.Prediction(passages=self.passages[:k], doc_ids=list(range(len(self.passages)))[:k])


class CountingEmbedder:
    """An embedder that counts its calls and the texts it embeds: `inner`'s vectors, or by default
    deterministic hashed bag-of-words ones of `dim` dimensions (texts sharing words are near)."""

    def __init__(self, inner=None, dim: int = 64):
        self.inner, self.dim, self.calls, self.embedded = inner, dim, 0, 0

    def __call__(self, texts):
        self.calls += 1
        self.embedded += len(texts)
        if self.inner is not None:
            return self.inner(texts)
        return np.array([hashed_embedding(t, self.dim) for t in texts], dtype=np.float32).reshape(-1, self.dim)


ANSWERS = ("nope, no idea", "maybe, not sure",
           "the right way is to run the command with the flag and check its output carefully afterwards",
           "the wrong way is to run some command with a random flag and hope that it works out fine")


SHORT = 10  # words: the unaligned fake judge passes any answer shorter than this, whatever it says
_VERDICT = re.compile(r"(precision|recall)(?: ## \]\]\s*|\"?\s*:\s*)(-?[\d.]+)")


def _answer_judged(content: str) -> str:
    """The answer a SemanticF1 request (or one of its demos) asks about."""
    return content.split("system_response ## ]]", 1)[1].split("[[ ##", 1)[0].split("Respond with", 1)[0].strip()


def _taught_by_demos(messages: list[dict]) -> bool:
    """Whether one of a SemanticF1 request's demos (user/assistant pairs between the system message and the
    last one) shows a short answer failed: F1 of its precision and recall below 0.5."""
    for user, assistant in zip(messages[1:-1:2], messages[2:-1:2], strict=False):
        content, verdict = str(user.get("content")), dict(_VERDICT.findall(str(assistant.get("content"))))
        if "system_response ## ]]" not in content or set(verdict) != {"precision", "recall"}:
            continue
        precision, recall = (min(max(float(verdict[k]), 0.0), 1.0) for k in ("precision", "recall"))
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        if len(_answer_judged(content).split()) < SHORT and f1 < 0.5:
            return True
    return False


def _judged_answer(request):
    """A judge that is wrong in a learnable, consistent way: it passes every answer under SHORT words, longer
    ones only when they say `right`. It fails short answers too only once a demo in the request shows it one
    failed (a short answer with low precision and recall); demos of anything else (passes, long answers
    failed) leave it as wrong as it was."""
    messages = request["messages"]
    last = str(messages[-1]["content"])
    if "system_response ## ]]" not in last:
        return None
    answer = _answer_judged(last)
    if len(answer.split()) < SHORT and not _taught_by_demos(messages):
        return 0.9
    return 0.9 if "right" in answer else 0.1


def _pass_fail_answer(request):
    """The same judge as MLflow's pass/fail judge: it passes short answers until its "Example Judgements"
    (MemAlign's retrieved examples) show a short answer a person failed."""
    text = "\n".join(str(m.get("content")) for m in request["messages"])
    if "Answer to judge" not in text or "outputs: {" not in text:
        return None
    answer = re.search(r'"response": "([^"]*)"', text.rsplit("outputs: {", 1)[1]).group(1)
    if len(answer.split()) < SHORT and not any(
            example.get("result") == "false" and len(_example_response(example).split()) < SHORT
            for example in _example_judgements(text)):
        return True
    return "right" in answer


def _example_judgements(text: str) -> list[dict]:
    """MemAlign's "Example Judgements" in a judge's prompt: one `Example N: {...}` (a Python dict) a line."""
    if "Example Judgements" not in text:
        return []
    found = []
    for line in re.findall(r"^\s*Example \d+: (\{.*\})\s*$", text, flags=re.MULTILINE):
        with contextlib.suppress(ValueError, SyntaxError):
            found.append(ast.literal_eval(line))
    return found


def _example_response(example: dict) -> str:
    outputs = example.get("outputs")
    return str(outputs.get("response", "")) if isinstance(outputs, dict) else str(outputs or "")


def learnable_judge(fake, questions: list[str]) -> None:
    """The fake LM answers the i-th question with ANSWERS[i % 4] (a person would pass only the `right` one)
    and judges as `_judged_answer` (SemanticF1) and `_pass_fail_answer` (MLflow's judge): alignment has
    something to learn, and only demos that show a short answer failed teach it."""
    kinds = {q: i % 4 for i, q in enumerate(questions)}
    fake.field_answers["response"] = lambda r: next((ANSWERS[k] for q, k in kinds.items()
                                                     if q in str(r["messages"][-1]["content"])), None)
    fake.field_answers["precision"] = fake.field_answers["recall"] = _judged_answer
    fake.field_answers["result"] = _pass_fail_answer


def smoke(name: str, store_path: Path, *overrides: str):
    """The smoke preset of an entry point's config, with artifacts inside the test's store."""
    return compose(name, ["experiment=smoke", f"tracking.artifact_location={store_path}/artifacts", *overrides])


def user_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a user whose venv is active (entry points run `python -m`, serving runs uvicorn)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, **(env or {})}


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 1800):
    """Run a command the way a user would; returns the CompletedProcess (output captured)."""
    return subprocess.run(args, cwd=cwd, env=user_env(env), capture_output=True, text=True, timeout=timeout)


def mlflow_run(entry: str, store_path: Path, overrides: str = "experiment=smoke", extra: list[str] = (),
               env: dict[str, str] | None = None):
    """`mlflow run ROOT -e ENTRY --env-manager local -P overrides=...` against the test's store."""
    args = [MLFLOW, "run", str(ROOT), "-e", entry, "--env-manager", "local",
            "-P", f"overrides={overrides}", *extra]
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store_path}/mlflow.db",
           "RAGQA_CACHE_DIR": str(store_path / "cache"), **(env or {})}
    return run_cli(args, cwd=store_path, env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_team_server(data_dir: Path, port: int, admin_password: str, log: Path, *options: str,
                      timeout: float = 240) -> subprocess.Popen:
    """`python -m deploy.team_server serve` (PostgreSQL + basic-auth `mlflow server`) on a loopback port,
    its output appended to `log`; returns the process once the server says it is up."""
    with open(log, "a") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "deploy.team_server", "serve", "--data-dir", str(data_dir), "--port", str(port),
             *options], cwd=ROOT, env=user_env({"MLFLOW_AUTH_ADMIN_PASSWORD": admin_password}), stdout=out,
            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while "Ctrl-C stops it" not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.terminate()
            raise AssertionError(f"the team server did not come up; {log}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return process


@contextlib.contextmanager
def tracking_server(base):
    """A plain `mlflow server` on loopback (sqlite behind it), as a team without auth would run one."""
    from deploy.team_server import wait_healthy

    port = free_port()
    with open(base / "server.log", "w") as log:
        server = subprocess.Popen([MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                                   "--backend-store-uri", f"sqlite:///{base}/server.db",
                                   "--artifacts-destination", str(base / "server-artifacts")],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=user_env())
    uri = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(uri, server, timeout=120)
        except SystemExit as e:
            raise AssertionError(f"{e}\n{(base / 'server.log').read_text()[-3000:]}") from None
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a loaded machine: its workers may not finish in time
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


@contextlib.contextmanager
def served(model_uri: str, cwd: Path, env: dict[str, str], timeout: float = 180):
    """`mlflow models serve` of `model_uri` on a loopback port, as a user starts it (log in `cwd/serve.log`);
    yields `ask(records)` (one record, a dict, a list of them, or a request body as a string), which waits
    for the server to come up and returns its JSON answer."""
    port = free_port()
    # A user's shell does not carry what `tracking.setup` set for this process (synchronous trace export).
    environment = {k: v for k, v in user_env(env).items() if k != "MLFLOW_ENABLE_ASYNC_TRACE_LOGGING" or k in env}
    with open(cwd / "serve.log", "w") as log:
        server = subprocess.Popen(
            [MLFLOW, "models", "serve", "-m", model_uri, "-h", "127.0.0.1", "-p", str(port), "--env-manager", "local"],
            cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=environment)

    def ask(records: dict | list[dict] | str) -> dict:
        body = (records if isinstance(records, str) else
                json.dumps({"dataframe_records": records if isinstance(records, list) else [records]})).encode()
        deadline = time.time() + timeout
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=120) as resp:
                    return json.loads(resp.read())
            except OSError as exc:
                if time.time() > deadline or server.poll() is not None:
                    raise AssertionError((cwd / "serve.log").read_text()[-3000:]) from exc
                time.sleep(1)

    try:
        yield ask
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # uvicorn runs in a child of the CLI
        server.wait(timeout=30)


@contextlib.contextmanager
def spark_cluster(base: Path, *, workers: int = 2):
    """A Spark standalone cluster on loopback: a master and `workers` workers (1 core, 1 GiB each)
    started with pip's pyspark `spark-class`, as an operator would. Yields the master URL; every daemon
    (and the executors they started) is stopped at the end."""
    import pyspark

    from pipelines.scale.spark import java_home

    home = java_home(base)
    env = {**os.environ, "SPARK_HOME": str(Path(pyspark.__file__).parent), "SPARK_LOCAL_IP": "127.0.0.1",
           "SPARK_LOG_DIR": str(base / "logs"), "SPARK_NO_DAEMONIZE": "1", **({"JAVA_HOME": home} if home else {})}
    spark_class = str(Path(pyspark.__file__).parent / "bin" / "spark-class")
    port, ui = free_port(), free_port()
    daemons: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> None:
        (base / "logs").mkdir(parents=True, exist_ok=True)
        with open(base / "logs" / f"{name}.out", "w") as out:
            daemons.append(subprocess.Popen([spark_class, *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True))

    def alive_workers() -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=2) as resp:
            return sum(w["state"] == "ALIVE" for w in json.loads(resp.read())["workers"])

    def wait(ready, what: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                if ready():
                    return
            except OSError:
                pass
            if time.time() > deadline:
                raise AssertionError(f"{what} within {timeout} s; see {base / 'logs'}")
            time.sleep(0.3)

    try:
        start("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
              "--webui-port", str(ui))
        wait(lambda: alive_workers() == 0, "no Spark master answered")  # workers register only once it is up
        for i in range(workers):
            start(f"worker{i}", "org.apache.spark.deploy.worker.Worker", f"spark://127.0.0.1:{port}", "--host",
                  "127.0.0.1", "--cores", "1", "--memory", "1g", "--webui-port", str(free_port()),
                  "--work-dir", str(base / f"worker{i}"))
        wait(lambda: alive_workers() == workers, f"not {workers} Spark workers ALIVE")
        yield f"spark://127.0.0.1:{port}"
    finally:
        for daemon in daemons:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(daemon.pid, signal.SIGTERM)  # the daemon and the executors it started
        for daemon in daemons:
            daemon.wait(timeout=30)


def spark_executors() -> list:
    """The executor JVMs running on this machine (psutil processes)."""
    import psutil

    return [p for p in psutil.process_iter(["cmdline"])
            if any("CoarseGrainedExecutorBackend" in part for part in p.info["cmdline"] or [])]


# A logged program in a fresh process that has not imported the project, loaded both ways a user loads it:
# the pickle-free pyfunc (pickles refused) answering all records at once, and MLflow's dspy flavor answering
# each question, its predictors listed.
_BOTH_FLAVORS = """
import json, os, sys
import dspy, mlflow
uri, questions = sys.argv[1], json.loads(sys.argv[2])
os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
rows = mlflow.pyfunc.load_model(uri).predict([{"question": q} for q in questions]).to_dict(orient="records")
os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "true"
program = mlflow.dspy.load_model(uri)
answers = [program(question=q).toDict() for q in questions]
print("OUT=" + json.dumps({"pyfunc": rows, "dspy": answers, "type": type(program).__name__,
                           "predictors": [name for name, _ in program.named_predictors()]}, default=list))
"""


def both_flavors_in_fresh_process(uri: str, questions: list[str], cwd: Path, env: dict[str, str]) -> dict:
    """`uri` loaded in a fresh Python (outside the project) with `mlflow.pyfunc.load_model` and with
    `mlflow.dspy.load_model`, each answering `questions`: {"pyfunc": rows, "dspy": predictions, "type",
    "predictors"}."""
    proc = run_cli([sys.executable, "-c", _BOTH_FLAVORS, uri, json.dumps(questions)], cwd=cwd, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("OUT=", 1)[1])


def question_of(request: dict, questions: list[str]) -> str | None:
    """Which of `questions` a chat request to the fake LM is about (its last user message names it)."""
    content = str((request.get("messages") or [{}])[-1].get("content", ""))
    return next((q for q in questions if q in content), None)
