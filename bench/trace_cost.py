"""What MLflow DSPy tracing costs per example, and which export settings bring it down (BENCHMARKS.md, 1).

In one process per setting, `pipelines.scoring.evaluate` runs cot + the default metrics (each an assessment
on the example's trace) against the fake LM, --evals times after a warm-up. Medians of: wall time until every
trace and assessment is stored (the evaluation alone in brackets), CPU, SQL statements and time in sqlite per
example; traces logged. Settings: no-mlflow; traces-off; default (async export, one writer); default+judge
(judge traced too); sync (each evaluation thread writes its traces); sync+wal (sqlite in WAL mode); async-10
(MLflow's 10 writers). With --cached every LM call is answered from DSPy's cache (issue 13: target traced
<= 1.5x traces-off, one trace per example).

    .venv/bin/python bench/trace_cost.py                                   # 16 examples, 50 ms, 2 threads
    .venv/bin/python bench/trace_cost.py --cached --examples 300 --threads 24 --latency 0 --evals 2
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import threading
import time

import dspy

import _common as common

SETTINGS = ("no-mlflow", "traces-off", "default", "default+judge", "sync", "sync+wal", "async-10")
SYNC = {"MLFLOW_ENABLE_ASYNC_TRACE_LOGGING": "false"}
ENVIRONMENT = {"sync": SYNC, "sync+wal": SYNC, "async-10": {"MLFLOW_ASYNC_TRACE_LOGGING_MAX_WORKERS": "10"}}


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
    from pipelines.scoring import evaluate

    store = common.scratch("trace-cost")
    common.isolate_mlflow(store)
    os.environ.update(ENVIRONMENT.get(args.setting, {}))
    extra = ["tracking.log_traces=false"] * (args.setting == "traces-off") + ["lm.cache=true"] * args.cached
    dspy.configure_cache(disk_cache_dir=str(store / "dspy-cache"))
    cfg, program, metric = common.cot_judged(args.api_base, store, *extra, trace_judge=args.setting == "default+judge")
    devset, n = common.examples(args.examples), args.examples
    traced = args.setting not in ("no-mlflow", "traces-off")
    stats, samples, run = collections.Counter(), [], contextlib.nullcontext()
    if args.setting != "no-mlflow":
        import mlflow

        from pipelines import tracking
        from pipelines.tracking.traces import count_traces, log_assessments

        stats = sql_counter()
        tracking.setup(cfg)
        if args.setting == "sync+wal":
            import sqlite3

            sqlite3.connect(store / "mlflow.db").execute("PRAGMA journal_mode=WAL").fetchall()
        run = tracking.run("bench-trace-cost", cfg)
    trace_id = tracking.last_trace_id if traced else None
    with run as active:
        count = (lambda: count_traces(active.info.run_id)) if traced else (lambda: 0)
        # Warm-up: imports LiteLLM etc., the first traces; --cached: fills the cache.
        evaluate(program, devset if args.cached else devset[:4], metric, args.threads, progress=False,
                 trace_id=trace_id)
        if traced:
            mlflow.flush_trace_async_logging()
        for _ in range(args.evals):
            before = count()
            stats.clear()
            wall, cpu = time.perf_counter(), time.process_time()
            result = evaluate(program, devset, metric, args.threads, progress=False, trace_id=trace_id)
            evaluated = time.perf_counter() - wall
            if traced:  # each example's metrics as assessments on its trace, and every trace stored
                log_assessments(result)
                mlflow.flush_trace_async_logging()
            samples.append({"wall": time.perf_counter() - wall, "eval": evaluated,
                            "cpu": (time.process_time() - cpu) / n, "stmts": stats["statements"] / n,
                            "sql_s": stats["seconds"] / n, "traces": count() - before})
    assert args.setting != "no-mlflow" or "mlflow" not in sys.modules
    medians = {k: common.median([s[k] for s in samples]) for k in samples[0]}
    return {**medians, "traces": min(s["traces"] for s in samples)}


def main(args) -> None:
    rows, base = [], None
    with common.fake_lm(latency=args.latency) as (api_base, _):
        for setting in args.settings:
            r = common.spawn_worker(args, setting=setting, api_base=api_base)
            base = r["wall"] if setting == "traces-off" else base
            background, traced = setting in ("default", "default+judge", "async-10"), setting not in SETTINGS[:2]
            rows.append([setting, f"{r['wall']:.2f}" + f" ({r['eval']:.2f})" * background,
                         f"{r['wall'] / base:.2f}x" if base else "-", f"{r['cpu'] * 1000:.0f}", f"{r['stmts']:.0f}",
                         f"{r['sql_s'] * 1000:.0f}", f"{r['traces']}/{args.examples}" if traced else "-"])
            print(rows[-1], file=sys.stderr)
    print(f"\nMachine: {common.machine()}; {args.examples} examples x (cot + judge), fake LM {args.latency * 1000:.0f} "
          f"ms, {'all calls cached, ' * args.cached}{args.threads} threads, medians of {args.evals} evaluations "
          "after warm-up\n")
    print(common.table(["setting", "eval wall s", "vs traces-off", "CPU ms/example", "SQL stmts/example",
                        "ms in sqlite/example", "traces logged"], rows))


if __name__ == "__main__":
    cli = common.parser(__doc__, examples=16, threads=2, latency=0.05, evals=4, cached=False)
    cli.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    common.run_script(cli, main, worker)
