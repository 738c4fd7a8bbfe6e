"""Wall time of the README's main command, offline, split by phase.

Runs `mlflow run . --env-manager local --experiment-name ragqa-arena-tech` from the repo root with
the venv's bin first on PATH, a temporary MLFLOW_TRACKING_URI and RAGQA_CACHE_DIR (cold index
cache), and RAGQA_SERVER_DIR pointing at a fresh temporary state dir, so the job starts its own
embedded llama.cpp server and that start is part of the measured time. Nothing is written to the
repo: the experiment is pre-created with its artifacts in the temp store, and
`-P overrides=hydra.run.dir=<temp>` moves Hydra's output dir (its cli.log dates the phases). (A server already running
in the shared default state dir is reported: it is not reused, but it would compete for CPU.)
The embedded server start is also timed on its own first, through `pipelines.server.ensure_server`
with a temporary state dir.

Phases come from the MLflow runs (start/end times, metric timestamps) and the server's state dir:
  startup   process start -> `main` run start (imports, config, server start, store)
  server    embedded server log created -> its state file written (healthy)
  per step  gap before the step's run (prepare + index load/build), evaluation(s) (run start or
            previous mark -> the semantic_f1 metric's timestamp), MIPROv2 compile (optimize:
            baseline score -> optimized score minus the optimized evaluation is not separable,
            so it is reported as "compile + optimized eval"), logging (last metric -> run end).
Target: total <= 15 min.

    .venv/bin/python bench/main_job.py              # ~10-15 min
    .venv/bin/python bench/main_job.py --analyze $TMPDIR/ragqa-bench/bench-main-XXXX   # re-read a store
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import EXPERIMENT, ROOT, VENV_BIN, create_experiment, log_time, machine, mlflow_run_env, scratch, table


def existing_server() -> str | None:
    """A live embedded server in the shared default state dir, if any."""
    from pipelines.server import running_servers

    live = running_servers()
    return f"pid {live[0]['pid']} at {live[0]['api_base']}" if live else None


def time_server_start(state_dir: Path) -> float:
    from pipelines.config import compose
    from pipelines.server import ensure_server, stop_owned_servers

    t = time.perf_counter()
    ensure_server({**compose("config").lm.server, "state_dir": str(state_dir)})
    seconds = time.perf_counter() - t
    stop_owned_servers()
    return seconds


def run_job(store: Path) -> tuple[float, float, int]:
    create_experiment(store)
    env = mlflow_run_env(store, RAGQA_SERVER_DIR=str(store / "server"))
    # hydra.run.dir keeps Hydra's outputs/ (config, cli.log) out of the repo too.
    cmd = [str(VENV_BIN / "mlflow"), "run", ".", "--env-manager", "local", "--experiment-name", EXPERIMENT,
           "-P", f"overrides=hydra.run.dir={store}/hydra"]
    start = time.time()
    with open(store / "job.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    (store / "job.json").write_text(json.dumps({"start": start, "end": time.time(), "rc": proc.returncode,
                                                "cmd": " ".join(cmd)}))
    return start, time.time(), proc.returncode


def phases(store: Path) -> list[list]:
    from mlflow.tracking import MlflowClient

    job = json.loads((store / "job.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    by_step = {}
    for r in runs:
        step = r.data.tags.get("step")
        if step and step not in by_step:
            by_step[step] = r
    t0 = job["start"]
    rel = lambda ms: ms / 1000 - t0  # noqa: E731
    rows = []
    main = by_step["main"]
    rows.append(["startup (CLI, imports, server, store)", 0.0, rel(main.info.start_time)])
    started = log_time(store / "hydra" / "cli.log", "Starting embedded LM server")
    states = sorted((store / "server").glob("*.json"))
    if started and states:  # the state file is written once the server answers
        rows.append(["  of which embedded server start", started - t0, states[0].stat().st_mtime - t0])
    previous_end = rel(main.info.start_time)

    def metric_time(run, key):
        history = client.get_metric_history(run.info.run_id, key)
        return rel(max(m.timestamp for m in history)) if history else None

    for step in ("cot", "rag", "optimize"):
        run = by_step.get(step)
        if run is None:
            continue
        start, end = rel(run.info.start_time), rel(run.info.end_time)
        label = "prepare + index build (embeddings)" if step == "rag" else "prepare + index load"
        rows.append([f"{step}: {'prepare' if step == 'cot' else label}", previous_end, start])
        scored = metric_time(run, "semantic_f1")
        if step == "optimize":
            base = metric_time(run, "baseline_semantic_f1")
            rows.append([f"{step}: baseline eval", start, base])
            rows.append([f"{step}: MIPROv2 compile + optimized eval", base, scored])
        else:
            rows.append([f"{step}: eval", start, scored])
        rows.append([f"{step}: log model + register", scored, end])
        previous_end = end
    rows.append(["main: comparison + shutdown", previous_end, job["end"] - t0])
    rows.append(["total", 0.0, job["end"] - t0])
    return [[name, f"{a:.1f}", f"{b:.1f}", f"{b - a:.1f}"] for name, a, b in rows]


def main(args) -> None:
    if args.analyze:
        store = Path(args.analyze)
        other, server_s = None, json.loads((store / "server_start.json").read_text())["seconds"]
    else:
        store = scratch("main")
        other = existing_server()
        server_s = time_server_start(store / "server-alone")
        (store / "server_start.json").write_text(json.dumps({"seconds": server_s}))
        print(f"embedded server start alone: {server_s:.1f} s; running the main job in {store} ...", file=sys.stderr)
        _, _, rc = run_job(store)
        if rc:
            print(f"main job failed with exit code {rc}; see {store / 'job.log'}", file=sys.stderr)
    job = json.loads((store / "job.json").read_text())
    total = job["end"] - job["start"]
    print(f"\nMachine: {machine()}\nCommand: {job['cmd']} (cwd {ROOT}; exit {job['rc']}); store {store}")
    if other:
        print(f"NOTE: another embedded server was running ({other}) and competed for CPU.")
    print(f"Embedded server start alone (ensure_server, temp state dir): {server_s:.1f} s\n")
    print(table(["phase", "from s", "to s", "seconds"], phases(store)))
    print(f"\nTotal {total / 60:.1f} min; target <= 15 min: {'met' if total <= 900 and job['rc'] == 0 else 'MISSED'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--analyze", help="only read the results of an earlier run in this store")
    main(parser.parse_args())
