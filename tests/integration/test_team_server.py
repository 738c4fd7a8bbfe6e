"""The team server as a team uses it: PostgreSQL + `mlflow server --app-name basic-auth` on loopback
(`python -m deploy.team_server`), entry points run against it with credentials from the environment,
LM and embeddings from the fake server. No mocks: every request goes through MLflow's auth app."""

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pgserver
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pgserver.utils import PostmasterInfo

from fake_lm import FakeLM, fake_model
from helpers import ROOT, fake_overrides, free_port, run_cli, start_team_server, user_env

ADMIN_PASSWORD = "admin-CANARY-7f3a9c21e5"
ALICE_PASSWORD = "alice-CANARY-0b6d4e8f12"  # the canary: must appear in no store, artifact or log
BOB_PASSWORD = "bob-password-5c1e7a"
EXPERIMENT, MODEL = "team-smoke", "ragqa-tech-smoke"


def start_server(server: dict) -> None:
    """The team server on its data dir and port, one worker, a fresh log; returns once it is healthy."""
    server["log"].write_text("")
    server["process"] = start_team_server(server["data"], int(server["url"].rsplit(":", 1)[1]), ADMIN_PASSWORD,
                                          server["log"], "--workers", "1")


def stop_server(server: dict) -> None:
    """SIGTERM, as a service manager stops it: MLflow, then PostgreSQL."""
    server["process"].send_signal(signal.SIGTERM)
    assert server["process"].wait(timeout=60) == 0
    assert "stopped" in server["log"].read_text()
    assert not (server["data"] / "pg" / "postmaster.pid").exists()  # PostgreSQL was shut down too
    server["logs"] = server.get("logs", "") + server["log"].read_text()


@pytest.fixture(scope="module")
def team_server():
    # Not under pytest's temp root: as root, pgserver runs PostgreSQL as another user and opens the folders
    # above its data to it, and any pytest session started meanwhile makes that root private again
    # (PostgreSQL then panics on its own files).
    data = Path(tempfile.mkdtemp(prefix="team-server-"))
    server = {"url": f"http://127.0.0.1:{free_port()}", "data": data, "log": data / "server.log"}
    start_server(server)
    yield server
    stop_server(server)
    shutil.rmtree(data)  # (kept when the server did not stop cleanly, to read its log)


def as_user(server, user: str, password: str, **extra: str) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": server["url"], "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": password, "RAGQA_CACHE_DIR": str(server["data"] / "cache"), **extra}


def entry_point(module: str, env: dict[str, str], fake: FakeLM, *overrides: str, multirun: bool = False,
                score: float = 0.5):
    args = [*(["-m"] if multirun else []), "experiment=smoke", "tracking=server", f"tracking.experiment={EXPERIMENT}",
            *fake_overrides(fake, score=score), *overrides]
    started = time.monotonic()
    proc = run_cli([sys.executable, "-m", f"pipelines.{module}", *args], cwd=ROOT, env=env, timeout=600)
    return proc, time.monotonic() - started


def admin_client(server, monkeypatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    return MlflowClient(tracking_uri=server["url"])


def all_runs(client: MlflowClient) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, max_results=1000)


def one_line_error(proc) -> str:
    assert proc.returncode != 0, proc.stdout[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return line


def test_down_server_and_wrong_password_fail_fast_with_no_run(team_server, monkeypatch, fake):
    client = admin_client(team_server, monkeypatch)
    runs_before = len(all_runs(client))
    down = as_user(team_server, "admin", ADMIN_PASSWORD, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}")
    # Fast is measured against a job that stops on its config before it asks any server (startup and imports
    # only, which a loaded machine slows down): neither failure may add a retry loop on top of that.
    bad_config, startup_seconds = entry_point("cot", down, fake, "scoring.confidence=2")
    assert "scoring.confidence must lie in (0, 1)" in one_line_error(bad_config)
    wrong, wrong_seconds = entry_point("cot", as_user(team_server, "admin", "not-the-password-123"), fake)
    unreachable, down_seconds = entry_point("cot", down, fake)
    assert fake.calls == fake.embedding_calls == 0
    line = one_line_error(wrong)
    assert wrong_seconds < startup_seconds + 15, (wrong_seconds, startup_seconds)
    assert f"{team_server['url']} refused the credentials of 'admin' (HTTP 401)" in line
    assert "MLFLOW_TRACKING_PASSWORD" in line and "not-the-password" not in wrong.stdout + wrong.stderr
    line = one_line_error(unreachable)
    assert down_seconds < startup_seconds + 15, (down_seconds, startup_seconds)
    assert "is unreachable (GET /health: connection refused)" in line, line
    assert len(all_runs(client)) == runs_before


def test_team_runs_register_load_and_keep_readers_out(team_server, monkeypatch, tmp_path, fake):
    url = team_server["url"]
    admin = {**as_user(team_server, "admin", ADMIN_PASSWORD), "TEAM_SERVER_USER_PASSWORD": ALICE_PASSWORD}
    proc = run_cli([sys.executable, "-m", "deploy.team_server", "add-user", "alice"], cwd=ROOT, env=admin)
    assert proc.returncode == 0 and "created user alice" in proc.stdout, proc.stderr[-2000:]
    alice = as_user(team_server, "alice", ALICE_PASSWORD)
    logs = [proc.stdout, proc.stderr]
    for module in ("cot", "rag"):
        proc, seconds = entry_point(module, alice, fake, score=1.0)
        logs += [proc.stdout, proc.stderr]
        assert proc.returncode == 0, proc.stderr[-3000:]
        print(f"{module} against the team server: {seconds:.0f} s")
    assert fake.embedding_calls > 0

    client = admin_client(team_server, monkeypatch)
    runs = {r.data.tags["step"]: r for r in all_runs(client) if r.data.tags.get("step") in ("cot", "rag")}
    assert sorted(runs) == ["cot", "rag"]
    for run in runs.values():
        assert run.info.status == "FINISHED" and run.data.metrics["semantic_f1"] == 100.0
        assert run.info.user_id == "alice"  # the server records who logged it
        assert not any(ALICE_PASSWORD in v for v in [*run.data.params.values(), *run.data.tags.values()])
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.version == "1" and champion.run_id == runs["cot"].info.run_id

    # A fresh process loads the champion through the server, with alice's credentials only, and
    # with pickles refused (the variable's unset default would allow them): models from code. The
    # shared registry holds no pickle at all (tracking=server logs no `dspy` flavor by default).
    code = ("import mlflow, pathlib\n"
            f"files = pathlib.Path(mlflow.artifacts.download_artifacts('models:/{MODEL}@champion'))\n"
            "print('PICKLES=' + str([p.name for p in files.rglob('*') if p.is_file() and "
            "(p.suffix == '.pkl' or p.read_bytes()[:1] == b'\\x80')]))\n"
            f"model = mlflow.pyfunc.load_model('models:/{MODEL}@champion')\n"
            "print('ANSWER=' + model.predict({'question': 'how do I undo a commit?'})['response'][0])\n")
    proc = run_cli([sys.executable, "-c", code], cwd=tmp_path,
                   env={**alice, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"})
    logs += [proc.stdout, proc.stderr]
    assert proc.returncode == 0 and "ANSWER=fake response" in proc.stdout, proc.stderr[-3000:]
    assert "PICKLES=[]" in proc.stdout

    # bob may read the experiment and nothing more (default_permission READ for what nobody granted).
    bob_admin = {**admin, "TEAM_SERVER_USER_PASSWORD": BOB_PASSWORD}
    proc = run_cli([sys.executable, "-m", "deploy.team_server", "add-user", "bob", "--experiment", EXPERIMENT,
                    "--permission", "READ"], cwd=ROOT, env=bob_admin)
    assert proc.returncode == 0 and f"bob: READ on experiment {EXPERIMENT}" in proc.stdout, proc.stderr[-2000:]
    runs_before = len(all_runs(client))
    refused, seconds = entry_point("cot", as_user(team_server, "bob", BOB_PASSWORD), fake)
    line = one_line_error(refused)
    assert seconds < 20 and f"bob may not write to experiment '{EXPERIMENT}' on {url} (permission READ)" in line
    assert len(all_runs(client)) == runs_before
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", BOB_PASSWORD)
    with pytest.raises(MlflowException, match="error code 403"):
        MlflowClient(tracking_uri=url).set_registered_model_alias(MODEL, "champion", runs["rag"].data.tags[
            "registered_version"])
    assert client.get_model_version_by_alias(MODEL, "champion").version == "1"

    # The passwords are nowhere in the store (both databases), the artifacts or the logs.
    pgdata = team_server["data"] / "pg"
    socket_dir = PostmasterInfo.read_from_pgdata(pgdata).socket_dir
    pg_dump = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_dump"
    dumps = [subprocess.run([str(pg_dump), f"postgresql://postgres@/{db}?host={socket_dir}"], capture_output=True,
                            text=True, check=True).stdout for db in ("mlflow", "mlflow_auth")]
    assert EXPERIMENT in dumps[0] and "alice" in dumps[1]  # the dumps hold the runs and the users
    artifacts = [p.read_bytes() for p in (team_server["data"] / "artifacts").rglob("*") if p.is_file()]
    assert len(artifacts) > 10
    logs.append(team_server["log"].read_text())  # (the outage test below checks the logs of later starts)
    for secret in (ALICE_PASSWORD, ADMIN_PASSWORD, BOB_PASSWORD):
        assert not any(secret in text for text in dumps + logs)
        assert not any(secret.encode() in blob for blob in artifacts)


def test_parallel_sweep_against_the_server_nests_four_finished_jobs(team_server, monkeypatch, fake):
    admin = as_user(team_server, "admin", ADMIN_PASSWORD)
    proc, seconds = entry_point("rag", admin, fake, "tracking.experiment=team-sweep",
                                f"hydra.sweep.dir={team_server['data']}/multirun", "hydra/launcher=parallel",
                                "hydra.launcher.n_jobs=4", "program.k=1,2,3,4", multirun=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"4-job sweep against the team server: {seconds:.0f} s")
    client = admin_client(team_server, monkeypatch)
    runs = client.search_runs([client.get_experiment_by_name("team-sweep").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    jobs = sorted((r for r in runs if r is not parent), key=lambda r: int(r.data.tags["sweep.job"]))
    assert parent.info.run_name == "sweep-rag" and parent.info.status == "FINISHED"
    assert [j.info.run_name for j in jobs] == ["rag k=1", "rag k=2", "rag k=3", "rag k=4"]
    assert all(j.info.status == "FINISHED" and "semantic_f1" in j.data.metrics
               and j.data.tags["mlflow.parentRunId"] == parent.info.run_id for j in jobs)
    assert {"comparison.json", "comparison.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent.data.metrics["jobs_finished"] == 4


# The stress test's jobs: forked once the imports are done and before any request (no job shares another's
# connections), each opens a run per experiment, waits until all have, and logs train and dev as a step does.
DATASET_JOBS = """
import logging, multiprocessing, os, sys, mlflow
from pipelines import tracking
from pipelines.tracking.evaluation import log_datasets
from pipelines.config import compose
from pipelines.data import load_splits

cfg = compose("cot", ["experiment=smoke"])
splits = load_splits(cfg.data)
logging.basicConfig(format="%(name)s: %(message)s")  # on stderr: when a job met another's row
logging.getLogger("pipelines.tracking.evaluation").setLevel(logging.INFO)
jobs, experiments = int(sys.argv[1]), sys.argv[2:]
fork = multiprocessing.get_context("fork")
together = fork.Barrier(jobs)

def job():
    said = os.dup(1)  # one line per outcome, in one write; MLflow's own prints ("View run ...") go to stderr
    os.dup2(2, 1)
    for experiment_id in experiments:
        with mlflow.start_run(experiment_id=experiment_id):
            together.wait(timeout=120)
            try:
                log_datasets({"train": splits.train, "dev": splits.dev}, cfg.data)
                os.write(said, b"ok\\n")
            except mlflow.exceptions.MlflowException as error:
                os.write(said, f"failed: {error.message.splitlines()[0][:300]}\\n".encode())

workers = [fork.Process(target=job) for _ in range(jobs)]
for worker in workers:
    worker.start()
for worker in workers:
    worker.join()
sys.exit(max(worker.exitcode for worker in workers))
"""


def test_parallel_jobs_logging_the_same_dataset_all_succeed(team_server, monkeypatch):
    """Eight processes, each with its own run, log the same dataset, new to the experiment, at the same
    moment, five times: the store checks for the dataset's row, then inserts it, so several may find none."""
    jobs, rounds = 8, 5
    client = admin_client(team_server, monkeypatch)
    experiments = [client.create_experiment(f"dataset-race-{n}") for n in range(rounds)]
    started = time.monotonic()
    proc = run_cli([sys.executable, "-c", DATASET_JOBS, str(jobs), *experiments], cwd=ROOT, timeout=300,
                   env=as_user(team_server, "admin", ADMIN_PASSWORD))
    outcomes = proc.stdout.splitlines()
    failures = [o for o in outcomes if o != "ok"]
    met = proc.stderr.count("was logged by another run at the same moment")
    print(f"{jobs} jobs x {rounds} rounds logging one dataset: {len(failures)} of {len(outcomes)} failed, "
          f"{met} logs met another job's insert, {time.monotonic() - started:.0f} s; {failures[:1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not failures and len(outcomes) == jobs * rounds, outcomes
    for experiment_id in experiments:
        runs = client.search_runs([experiment_id])
        assert len(runs) == jobs and all(r.info.status == "FINISHED" for r in runs)
        inputs = [{(d.dataset.name, d.dataset.digest) for d in r.inputs.dataset_inputs} for r in runs]
        assert len(inputs[0]) == 2 and all(i == inputs[0] for i in inputs)  # train and dev, the same for all


def test_server_gone_mid_run_ends_the_job_in_one_line_and_keeps_what_was_logged(team_server, monkeypatch, fake):
    """MLflow's client rides out a short restart with its retries (minutes by default); with the retries
    lowered, a server that stays down ends the job in one line, exit 1, and what was logged stays."""
    admin = as_user(team_server, "admin", ADMIN_PASSWORD, MLFLOW_HTTP_REQUEST_MAX_RETRIES="1")
    args = ["experiment=smoke", "tracking=server", "tracking.experiment=outage",
            *fake_overrides(fake, latency_ms=1000)]
    job = subprocess.Popen([sys.executable, "-m", "pipelines.cot", *args], cwd=ROOT, env=user_env(admin),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while fake.calls == 0:  # the run is open and evaluating
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-3000:]
        time.sleep(0.2)
    stop_server(team_server)
    out, err = job.communicate(timeout=300)
    assert job.returncode == 1, err[-3000:]
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]  # then MLflow's exit log lines
    assert line.startswith(f"error: the tracking store {team_server['url']} stopped answering during run "), line
    assert "what was logged before stays there" in line and "Traceback" not in err
    start_server(team_server)
    client = admin_client(team_server, monkeypatch)
    (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
    assert run.info.run_id in line and run.info.status == "RUNNING"  # it could not be marked FAILED
    assert run.data.params["lm.model"] == fake_model(latency_ms=1000) and "config.yaml" in {a.path for a in
                                                                                            client.list_artifacts(run.info.run_id)}
    logs = out + err + team_server["logs"]
    assert ADMIN_PASSWORD not in logs
