"""Faults: a dying LM server, concurrent writers, stale models. Each test fails if the behaviour breaks."""

import json
import sys
import time

import dspy
import mlflow
import pytest
from mlflow.entities import LoggedModelStatus

from pipelines.errors import ConfigError, LMServerError
from pipelines.steps.variant import run_variant
from pipelines.tracking.models import load_program

from fake_lm import FakeLM
from helpers import ROOT, fake_overrides, mlflow_run, run_cli, smoke


def test_server_dying_mid_evaluation_fails_the_run_but_keeps_scored_examples(store):
    with FakeLM(die_after=2) as fake:  # its own server: one example (program + judge call), then it is gone
        cfg = smoke("cot", store, *fake_overrides(fake))
        with pytest.raises(LMServerError, match=rf"{fake.api_base} stopped answering"):
            run_variant(cfg)
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FAILED" and "stopped answering" in run.data.tags["error"]
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/eval/dev_results.json"))
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert len(rows) == 3
    assert sum(1 for r in rows if not r["error"]) == 1 and rows[0]["prediction"] == "fake response"
    assert run.data.metrics["failed_examples"] == 2
    (model,) = mlflow.MlflowClient().search_logged_models(experiment_ids=[run.info.experiment_id])
    assert model.name == "cot" and model.status.to_int() == LoggedModelStatus.FAILED.to_int()  # not PENDING


def test_garbage_from_the_lm_is_counted_and_the_run_completes(store, fake):
    result = run_variant(smoke("cot", store, *fake_overrides(fake, "garbage")))
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["failed_examples"] == 3 and run.data.metrics["semantic_f1"] == 0.0


def test_two_runs_writing_to_one_store_at_once_both_complete(store, fake):
    overrides = " ".join(["experiment=smoke", f"tracking.artifact_location={store}/artifacts",
                          *fake_overrides(fake, latency_ms=50)])
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db", "RAGQA_CACHE_DIR": str(store / "cache")}
    code = ("import subprocess, sys\n"
            "cmd = [sys.executable, '-m', 'pipelines.cot', *sys.argv[1:]]\n"
            "procs = [subprocess.Popen(cmd) for _ in range(2)]\n"
            "sys.exit(max(p.wait() for p in procs))\n")
    proc = run_cli([sys.executable, "-c", code, *overrides.split()], cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        assert run.data.metrics["num_examples"] == 3 and "semantic_f1" in run.data.metrics
        mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/eval/dev_results.json")
    versions = mlflow.MlflowClient().search_model_versions("name='ragqa-tech-smoke'")
    assert sorted(int(v.version) for v in versions) == [1, 2]


class Retired(dspy.Module):
    """Stands in for a class that an older version of the project had."""

    def forward(self, question):
        return dspy.Prediction(response=question)


def test_model_from_an_older_project_version_gives_a_clear_error(store, monkeypatch):
    import pipelines.programs as programs

    monkeypatch.setattr(programs, "Retired", Retired, raising=False)
    Retired.__module__, Retired.__qualname__ = "pipelines.programs", "Retired"
    with mlflow.start_run():
        with dspy.context(lm=None, callbacks=[]):
            info = mlflow.dspy.log_model(Retired(), name="program", code_paths=[str(ROOT / "pipelines")])
    monkeypatch.delattr(programs, "Retired")  # the newer code no longer has it
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")  # a pickle of our own
    with pytest.raises(ConfigError, match="incompatible version of this project"):
        load_program(info.model_uri)


@pytest.mark.parametrize("error, status",
                         [(KeyboardInterrupt(), "KILLED"), (RuntimeError("optimizer blew up"), "FAILED")])
def test_interrupted_compile_registers_nothing_and_keeps_the_champion(store, monkeypatch, error, status, fake):
    from pipelines.steps import optimize

    class Exploding:
        def compile(self, *args, **kwargs):
            raise error

    monkeypatch.setattr(optimize, "build_optimizer", lambda opt, metric: Exploding())
    with pytest.raises(type(error)):
        optimize.run_optimize(smoke("optimize", store, *fake_overrides(fake)))
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == status
    assert "baseline_semantic_f1" in run.data.metrics  # work done before the fault is kept
    assert mlflow.MlflowClient().search_model_versions("name='ragqa-tech-smoke'") == []
    models = mlflow.MlflowClient().search_logged_models(experiment_ids=[run.info.experiment_id])
    assert models and all(m.status.to_int() != LoggedModelStatus.PENDING.to_int() for m in models)


@pytest.mark.parametrize("module, args, message", [
    ("evaluate", [], "error: evaluate needs model_uri="),
    ("evaluate", ["model_uri=models:/no-such-model@champion"], "error: cannot load models:/no-such-model@champion"),
    ("main", ["steps=[cot,nope]"], "error: unknown steps ['nope']"),
])
def test_user_errors_are_one_line_and_exit_non_zero(store, module, args, message, fake):
    overrides = [*fake_overrides(fake), f"tracking.artifact_location={store}/artifacts"]
    proc = run_cli([sys.executable, "-m", f"pipelines.{module}", *overrides, *args], cwd=ROOT)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_evaluate_of_a_missing_model_starts_no_lm(store, tmp_path):
    """The default, embedded LM: a model URI that names nothing fails before its server would start."""
    servers = tmp_path / "llama-server"
    proc = run_cli([sys.executable, "-m", "pipelines.evaluate", "model_uri=models:/nope@champion",
                    f"tracking.artifact_location={store}/artifacts"], cwd=ROOT, env={"RAGQA_SERVER_DIR": str(servers)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot load models:/nope@champion")
    assert not servers.exists() or not any(servers.iterdir())  # no server was started, or even looked for


@pytest.mark.parametrize("lm", ["fake", "embedded", "unreachable"])
def test_main_fails_on_a_later_steps_config_before_any_lm_or_run(store, tmp_path, fake, lm):
    """An ensemble of 1 after optimize could never run: `mlflow run .` stops in one line before optimize
    runs, with no LM asked (the fake counts every request), no embedded server started (none recorded in
    its state directory), and no run but the one `mlflow run` opened, FAILED. With an LM nobody serves,
    the config's error still comes first."""
    servers = tmp_path / "llama-server"
    stack = {"fake": " ".join(fake_overrides(fake)), "embedded": "",
             "unreachable": "lm=openai lm.api_base=http://127.0.0.1:9/v1 lm.api_key_env=null"}[lm]
    started = time.monotonic()
    proc = mlflow_run("main", store, f"experiment=smoke tracking.artifact_location={store}/artifacts "
                      f"steps=[cot,optimize,ensemble] ensemble.size=1 {stack}",
                      env={"RAGQA_SERVER_DIR": str(servers)})
    print(f"lm={lm}: exit {proc.returncode} after {time.monotonic() - started:.1f} s")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: an ensemble needs at least 2 members; ensemble.size=1"], proc.stderr[-3000:]
    assert fake.calls == 0 and fake.embedding_calls == 0
    assert not servers.exists() or not any(servers.iterdir())
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]  # `mlflow run`'s own: no step's run was opened


def test_runs_record_the_command_line_overrides_with_secrets_masked(store, fake):
    canary = "sk-canary-overrides-0123"
    overrides = [*fake_overrides(fake), f"tracking.artifact_location={store}/artifacts", "experiment=smoke",
                 f"+lm.api_key={canary}"]
    proc = run_cli([sys.executable, "-m", "pipelines.cot", *overrides], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    recorded = run.data.tags["overrides"].split()
    assert "experiment=smoke" in recorded and "+lm.api_key=***" in recorded
    assert canary not in run.data.tags["overrides"] and canary not in str(run.data.params)
