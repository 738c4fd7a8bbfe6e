"""Where the harness's eval overhead goes: steady-state cost of MLflow DSPy tracing per example.

In one process per setting, `pipelines.scoring.evaluate` runs the cot program + the project's default
metrics (JudgedF1, token F1, ROUGE-L; each one an assessment on the example's trace) on 16
examples against the fake LM (own process, 50 ms/call), 2 threads, 4 times after a warm-up; the
table gives medians of wall time, process CPU time per example, and SQL statements / time in
sqlite per example (SQLAlchemy cursor events). Settings:
  * no-mlflow:  MLflow never imported;
  * traces-off: `pipelines.tracking.setup` + run with tracking.log_traces=false;
  * sync:       the project default (autolog traces of the program, MLFLOW_ENABLE_ASYNC_TRACE_LOGGING=false);
  * sync+judge: same, plus traces of the SemanticF1 judge's calls (tracking.trace_judge=true);
  * async:      same with MLFLOW_ENABLE_ASYNC_TRACE_LOGGING=true, timed up to
                `mlflow.flush_trace_async_logging()` so the deferred writes are counted.
No target: this explains the overhead.py figure.

    .venv/bin/python bench/trace_cost.py
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import threading
import time

from _common import ROOT, FakeLMProcess, fake_overrides, isolate_mlflow, machine, median, scratch, table

SETTINGS = ("no-mlflow", "traces-off", "sync", "sync+judge", "async")


def sql_counter():
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    stats, local, lock = collections.Counter(), threading.local(), threading.Lock()

    @event.listens_for(Engine, "before_cursor_execute")
    def before(*_):
        local.t = time.perf_counter()

    @event.listens_for(Engine, "after_cursor_execute")
    def after(*_):
        with lock:
            stats["statements"] += 1
            stats["seconds"] += time.perf_counter() - local.t
    return stats


def worker(args) -> dict:
    from concurrency import examples

    store = scratch("trace-cost")
    isolate_mlflow(store)
    if args.worker == "async":  # not the default: it drops metric feedback on traces
        os.environ["MLFLOW_ENABLE_ASYNC_TRACE_LOGGING"] = "true"
    import dspy

    from pipelines.config import compose
    from pipelines.lm import build_adapter, build_lm
    from pipelines.scoring import JudgedF1, Scorer, Scoring, evaluate

    extra = ["tracking.log_traces=false"] if args.worker == "traces-off" else []
    cfg = compose("cot", fake_overrides(args.api_base, store / "artifacts", *extra))
    lm, adapter = build_lm(cfg.lm), build_adapter(cfg.lm)
    dspy.configure(lm=lm, adapter=adapter)
    judge = JudgedF1(lm, traced=args.worker == "sync+judge")
    metric = Scorer(Scoring.from_cfg(cfg.scoring), judge)
    program, devset = dspy.ChainOfThought("question -> response"), examples(args.examples)
    evaluate(program, devset[:4], metric, args.threads, progress=False)  # imports LiteLLM etc.
    stats, walls, cpus, sql = collections.Counter(), [], [], []
    harness = {}  # with MLflow: each example's trace id, and the logging of its metrics on that trace

    def once():
        stats.clear()
        wall, cpu = time.perf_counter(), time.process_time()
        result = evaluate(program, devset, metric, args.threads, progress=False, trace_id=harness.get("trace_id"))
        if "assess" in harness:
            harness["assess"](result)
        if args.worker == "async":
            import mlflow

            mlflow.flush_trace_async_logging()
        walls.append(time.perf_counter() - wall)
        cpus.append((time.process_time() - cpu) / len(devset))
        sql.append((stats["statements"] / len(devset), stats["seconds"] / len(devset)))

    if args.worker == "no-mlflow":
        for _ in range(args.evals):
            once()
        assert "mlflow" not in sys.modules
    else:
        from pipelines import tracking

        stats = sql_counter()
        tracking.setup(cfg)
        if cfg.tracking.log_traces:
            harness.update(trace_id=tracking.last_trace_id, assess=tracking.log_assessments)
        with tracking.run("bench-trace-cost", cfg):
            evaluate(program, devset[:4], metric, args.threads, progress=False)  # first traces
            for _ in range(args.evals):
                once()
    return {"wall": median(walls), "cpu": median(cpus), "stmts": median([s[0] for s in sql]),
            "sql_s": median([s[1] for s in sql])}


def main(args) -> None:
    rows = []
    with FakeLMProcess(latency=args.latency) as fake:
        for setting in SETTINGS:
            cmd = [sys.executable, __file__, "--worker", setting, "--api-base", fake.api_base,
                   "--examples", str(args.examples), "--threads", str(args.threads), "--evals", str(args.evals)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                raise RuntimeError(proc.stderr[-3000:])
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append([setting, f"{r['wall']:.2f}", f"{r['cpu'] * 1000:.0f}", f"{r['stmts']:.0f}",
                         f"{r['sql_s'] * 1000:.0f}"])
            print(rows[-1], file=sys.stderr)
    print(f"\nMachine: {machine()}; {args.examples} examples x (cot + judge), fake LM {args.latency * 1000:.0f} ms, "
          f"{args.threads} threads, medians of {args.evals} evaluations after warm-up\n")
    print(table(["setting", "eval wall s", "CPU ms/example", "SQL stmts/example", "ms in sqlite/example"], rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--evals", type=int, default=4)
    parser.add_argument("--worker", choices=SETTINGS)
    parser.add_argument("--api-base")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
    else:
        main(args)
