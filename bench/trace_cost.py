"""What MLflow DSPy tracing costs per example, and which export settings bring it down.

In one process per setting, `pipelines.scoring.evaluate` runs the cot program + the project's default
metrics (JudgedF1, token F1, ROUGE-L; each one an assessment on the example's trace) against the fake
LM (own process), several times after a warm-up; the table gives medians of wall time (up to the point
every trace is in the store), process CPU per example, SQL statements and time in sqlite per example
(SQLAlchemy cursor events), and traces logged per evaluation. Settings:
  * no-mlflow:  MLflow never imported;
  * traces-off: `pipelines.tracking.setup` + run with tracking.log_traces=false;
  * default:    the project's default: traces exported off the evaluation threads by one writer
                (MLFLOW_ENABLE_ASYNC_TRACE_LOGGING=true, MLFLOW_ASYNC_TRACE_LOGGING_MAX_WORKERS=1),
                timed up to `mlflow.flush_trace_async_logging()`; the evaluation alone in brackets;
  * default+judge: same, plus traces of the SemanticF1 judge's calls (tracking.trace_judge=true);
  * sync:       every evaluation thread writes its own traces (MLFLOW_ENABLE_ASYNC_TRACE_LOGGING=false);
  * sync+wal:   same, on a store switched to sqlite's WAL journal;
  * async-10:   MLflow's own async default, 10 writer threads.
    .venv/bin/python bench/trace_cost.py                                   # 16 examples, 50 ms, 2 threads
    .venv/bin/python bench/trace_cost.py --cached --examples 300 --threads 24 --latency 0 --evals 2
The second is the cached re-evaluation of issue 13: every LM call answered from DSPy's cache
(target: traced <= 1.5x traces-off, and one trace per example).
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time

from _common import (
    ServerProcess,
    examples,
    fake_overrides,
    isolate_mlflow,
    machine,
    median,
    parser,
    run_script,
    scratch,
    spawn_worker,
    table,
)

SETTINGS = ("no-mlflow", "traces-off", "default", "default+judge", "sync", "sync+wal", "async-10")


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
    store = scratch("trace-cost")
    isolate_mlflow(store)
    if args.setting.startswith("sync"):
        os.environ["MLFLOW_ENABLE_ASYNC_TRACE_LOGGING"] = "false"
    if args.setting == "async-10":
        os.environ["MLFLOW_ASYNC_TRACE_LOGGING_MAX_WORKERS"] = "10"
    import dspy

    from pipelines.config import compose
    from pipelines.lm import build_adapter, build_lm
    from pipelines.scoring import JudgedF1, Scorer, Scoring, evaluate

    extra = ["tracking.log_traces=false"] if args.setting == "traces-off" else []
    if args.cached:
        extra += ["lm.cache=true"]
    cfg = compose("cot", fake_overrides(args.api_base, store / "artifacts", *extra))
    lm, adapter = build_lm(cfg.lm), build_adapter(cfg.lm)
    dspy.configure_cache(disk_cache_dir=str(store / "dspy-cache"))
    dspy.configure(lm=lm, adapter=adapter)
    judge = JudgedF1(lm, traced=args.setting == "default+judge")
    metric = Scorer(Scoring.from_cfg(cfg.scoring), judge)
    program, devset = dspy.ChainOfThought("question -> response"), examples(args.examples)
    warm_up = devset if args.cached else devset[:4]  # imports LiteLLM etc.; --cached: fills the cache
    stats, walls, evals, cpus, sql, traces = collections.Counter(), [], [], [], [], []
    traced = args.setting not in ("no-mlflow", "traces-off")
    harness = {}  # with MLflow: each example's trace id, and the logging of its metrics on that trace

    def count_traces(run_id):
        if not run_id:
            return 0
        from pipelines.tracking.traces import count_traces  # only with MLflow: no-mlflow never imports it

        return count_traces(run_id)

    def once(run_id=None):
        before = count_traces(run_id)
        stats.clear()
        wall, cpu = time.perf_counter(), time.process_time()
        result = evaluate(program, devset, metric, args.threads, progress=False, trace_id=harness.get("trace_id"))
        evals.append(time.perf_counter() - wall)
        if "assess" in harness:
            harness["assess"](result)
        if traced:
            mlflow.flush_trace_async_logging()
        walls.append(time.perf_counter() - wall)
        cpus.append((time.process_time() - cpu) / len(devset))
        sql.append((stats["statements"] / len(devset), stats["seconds"] / len(devset)))
        traces.append(count_traces(run_id) - before)

    if args.setting == "no-mlflow":
        evaluate(program, warm_up, metric, args.threads, progress=False)
        for _ in range(args.evals):
            once()
        assert "mlflow" not in sys.modules
    else:
        import mlflow

        from pipelines import tracking
        from pipelines.tracking.traces import log_assessments

        stats = sql_counter()
        tracking.setup(cfg)
        if args.setting == "sync+wal":
            import sqlite3

            sqlite3.connect(store / "mlflow.db").execute("PRAGMA journal_mode=WAL").fetchall()
        if cfg.tracking.log_traces:
            harness.update(trace_id=tracking.last_trace_id, assess=log_assessments)
        with tracking.run("bench-trace-cost", cfg) as active:
            evaluate(program, warm_up, metric, args.threads, progress=False,
                     trace_id=harness.get("trace_id"))  # first traces
            mlflow.flush_trace_async_logging()
            for _ in range(args.evals):
                once(active.info.run_id if traced else None)
    return {"wall": median(walls), "eval": median(evals), "cpu": median(cpus), "stmts": median([s[0] for s in sql]),
            "sql_s": median([s[1] for s in sql]), "traces": min(traces)}


def main(args) -> None:
    rows, base = [], None
    with ServerProcess("fake", latency=args.latency) as fake:
        for setting in args.settings:
            r = spawn_worker(args, setting=setting, api_base=fake.api_base)
            base = r["wall"] if setting == "traces-off" else base
            background = setting in ("default", "default+judge", "async-10")
            wall = f"{r['wall']:.2f}" + (f" ({r['eval']:.2f})" if background else "")
            rows.append([setting, wall, f"{r['wall'] / base:.2f}x" if base else "-", f"{r['cpu'] * 1000:.0f}",
                         f"{r['stmts']:.0f}", f"{r['sql_s'] * 1000:.0f}",
                         f"{r['traces']}/{args.examples}" if setting not in ("no-mlflow", "traces-off") else "-"])
            print(rows[-1], file=sys.stderr)
    print(f"\nMachine: {machine()}; {args.examples} examples x (cot + judge), fake LM {args.latency * 1000:.0f} ms, "
          f"{'all calls cached, ' if args.cached else ''}{args.threads} threads, medians of {args.evals} "
          "evaluations after warm-up\n")
    print(table(["setting", "eval wall s", "vs traces-off", "CPU ms/example", "SQL stmts/example",
                 "ms in sqlite/example", "traces logged"], rows))


if __name__ == "__main__":
    cli = parser(__doc__)
    cli.add_argument("--examples", type=int, default=16)
    cli.add_argument("--threads", type=int, default=2)
    cli.add_argument("--latency", type=float, default=0.05)
    cli.add_argument("--evals", type=int, default=4)
    cli.add_argument("--cached", action="store_true", help="answer every LM call from DSPy's cache")
    cli.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    run_script(cli, main, worker)
