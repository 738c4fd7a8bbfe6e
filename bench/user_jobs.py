"""Jobs run the way a user runs them: `mlflow run` from the repo root on a scratch store and its caches, in no
outer run, timed as whole processes with their peak RSS (bench/jobs.py, bench/programs.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mlflow.tracking import MlflowClient

import _common as common
from helpers import MLFLOW, user_env

FAKE_ENV = {"OPENAI_API_KEY": "sk-fake-bench",  # never sent anywhere but the loopback fake
            # LiteLLM otherwise retries fetching its price list from the internet at every start (seconds offline).
            "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


def mlflow_run(entry: str, overrides: list[str]) -> list[str]:
    return [MLFLOW, "run", ".", "-e", entry, "--env-manager", "local", "--experiment-name", common.EXPERIMENT,
            "-P", f"overrides={' '.join(overrides)}"]


def run_job(name: str, cmd: list[str], store: Path, env: dict[str, str]) -> dict:
    """`cmd` on the store (its output in `store/NAME.log`): exit code, wall seconds, peak RSS of the job and every
    descendant it waited for, and its start and end times."""
    env = user_env({"MLFLOW_TRACKING_URI": common.sqlite_uri(store), "RAGQA_CACHE_DIR": str(store / "cache"), **env})
    env = {k: v for k, v in env.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    start = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    with open(store / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=common.ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    record = {"rc": proc.returncode, "wall_s": time.time() - start, "peak_rss_mib": usage.ru_maxrss / 1024,
              "start": start, "end": time.time()}
    print(f"[{time.strftime('%H:%M:%S')}] {name}: exit {record['rc']}, {record['wall_s']:.0f} s, "
          f"{record['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
    return record


def run_phases(store: Path, phases: list[str], run_phase: Callable, args, **fake_options) -> dict:
    """Each phase in turn against one fake LM server (`fake_options` go to it), results.json rewritten after each
    so a long benchmark that stops keeps what it measured."""
    if not (store / "mlflow.db").exists():  # artifacts in the store: `mlflow run` would put them in the repo
        MlflowClient(common.sqlite_uri(store)).create_experiment(common.EXPERIMENT, (store / "artifacts").as_uri())
    results = {"store": str(store), "args": vars(args), "phases": []}
    with common.fake_lm(**fake_options) as (api_base, counts):
        for phase in phases:
            results["phases"].append(run_phase(phase, store, api_base, counts, args))
            (store / "results.json").write_text(json.dumps(results, indent=2))
    return results
