"""Wall time of the README's main command, offline, split by phase.

Runs `mlflow run . --env-manager local --experiment-name ragqa-arena-tech` from the repo root with
the venv's bin first on PATH, a temporary MLFLOW_TRACKING_URI and RAGQA_CACHE_DIR (cold index
cache), and RAGQA_SERVER_DIR pointing at a fresh temporary state dir, so the job starts its own
embedded llama.cpp server and that start is part of the measured time. Nothing is written to the
repo: the experiment is pre-created with its artifacts in the temp store, and
`-P overrides=hydra.run.dir=<temp>` moves Hydra's output dir. (A server already running in the
shared default state dir is reported: it is not reused, but it would compete for CPU.) The embedded
server start is also timed on its own first, with a private state dir; that server is gone before the job.

Phases come from the MLflow runs: their start and end, and their own phase timings (`time_<phase>_s`):
  startup   process start -> `main` run start (CLI, imports, config, embedded server start, store)
  per step  before its run: prepare, and the index load or build (`time_index_s`); in it: evaluation
            (`time_evaluate_s`; optimize: `time_baseline_evaluate_s` first), MIPROv2 compile
            (`time_compile_s`), log model + register (`time_log_model_s` + `time_register_s`), and the
            rest (config, datasets, results and assessments, trace export)
  main      last step's end -> job end (comparison chart, shutdown)
Target: total <= 15 min.

    .venv/bin/python bench/main_job.py              # ~10-15 min
    .venv/bin/python bench/main_job.py --overrides "experiment=smoke data.dev_size=1"   # a quick look
    .venv/bin/python bench/main_job.py --analyze $TMPDIR/ragqa-bench/bench-main-XXXX   # re-read a store
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from _common import (
    EXPERIMENT,
    ROOT,
    VENV_BIN,
    ServerProcess,
    create_experiment,
    machine,
    mlflow_run_env,
    parser,
    phase_times,
    run_job,
    scratch,
    step_runs,
    table,
)


def existing_server() -> str | None:
    """A live embedded server in the shared default state dir, if any."""
    from pipelines.server import running_servers

    live = running_servers()
    return f"{live[0]['process']} at {live[0]['api_base']}" if live else None


def phases(store: Path, job: dict) -> list[list]:
    by_step = {}
    for run in step_runs(store):
        by_step.setdefault(run.data.tags.get("step"), run)
    rel = lambda ms: ms / 1000 - job["start"]  # noqa: E731
    main = by_step["main"]
    rows = [["startup (CLI, imports, server, store)", 0.0, rel(main.info.start_time)]]
    previous_end = rel(main.info.start_time)
    for step in ("cot", "rag", "optimize"):
        run = by_step.get(step)
        if run is None:
            continue
        t, took = phase_times(run), rel(run.info.start_time)
        index = f" + index load/build ({t['index']:.1f} s)" if "index" in t else ""
        rows.append([f"{step}: prepare{index}", previous_end, took])
        spans = [("baseline eval", t.get("baseline_evaluate")), ("MIPROv2 compile", t.get("compile")),
                 ("eval" if step != "optimize" else "optimized eval", t.get("evaluate")),
                 ("log model + register", t.get("log_model", 0) + t.get("register", 0)),
                 ("rest of the run (config, datasets, results, traces)", t.get("other"))]
        for name, seconds in spans:
            if seconds is not None:  # the run's own timings laid end to end from its start
                rows.append([f"{step}: {name}", took, took + seconds])
                took += seconds
        previous_end = rel(run.info.end_time)
    rows.append(["main: comparison + shutdown", previous_end, job["end"] - job["start"]])
    rows.append(["total", 0.0, job["end"] - job["start"]])
    return [[name, f"{a:.1f}", f"{b:.1f}", f"{b - a:.1f}"] for name, a, b in rows]


def main(args) -> None:
    store = Path(args.analyze) if args.analyze else scratch("main")
    if not args.analyze:
        other = existing_server()
        with ServerProcess("local", state_dir=str(store / "server-alone")) as alone:
            (store / "server_start.json").write_text(json.dumps({"seconds": alone.start_seconds, "other": other}))
        print(f"embedded server start alone: {alone.start_seconds:.1f} s; running the main job in {store} ...",
              file=sys.stderr)
        create_experiment(store)
        # hydra.run.dir keeps Hydra's outputs/ (config, cli.log) out of the repo too.
        cmd = [str(VENV_BIN / "mlflow"), "run", ".", "--env-manager", "local", "--experiment-name", EXPERIMENT,
               "-P", f"overrides=hydra.run.dir={store}/hydra {args.overrides}".strip()]
        start = time.time()
        rc, _, _ = run_job(cmd, mlflow_run_env(store, RAGQA_SERVER_DIR=str(store / "server")), store / "job.log")
        (store / "job.json").write_text(json.dumps({"start": start, "end": time.time(), "rc": rc,
                                                    "cmd": " ".join(cmd)}))
        if rc:
            print(f"main job failed with exit code {rc}; see {store / 'job.log'}", file=sys.stderr)
    job, server = (json.loads((store / f).read_text()) for f in ("job.json", "server_start.json"))
    total = job["end"] - job["start"]
    print(f"\nMachine: {machine()}\nCommand: {job['cmd']} (cwd {ROOT}; exit {job['rc']}); store {store}")
    if server.get("other"):
        print(f"NOTE: another embedded server was running ({server['other']}) and competed for CPU.")
    print(f"Embedded server start alone (ensure_server, temp state dir): {server['seconds']:.1f} s\n")
    print(table(["phase", "from s", "to s", "seconds"], phases(store, job)))
    print(f"\nTotal {total / 60:.1f} min; target <= 15 min: {'met' if total <= 900 and job['rc'] == 0 else 'MISSED'}")


if __name__ == "__main__":
    cli = parser(__doc__)
    cli.add_argument("--overrides", default="", help="more Hydra overrides for the job (the figure uses none)")
    cli.add_argument("--analyze", help="only read the results of an earlier run in this store")
    main(cli.parse_args())
