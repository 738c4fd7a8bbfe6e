"""What tracing costs per example, by way of writing the traces (BENCHMARKS.md, 1). In one process per setting,
`pipelines.evaluation.scoring.evaluate` runs cot + the default metrics (assessments on the traces) against the fake
LM, --evals times after a warm-up; medians of wall time until traces and assessments are stored (evaluation alone in
brackets), CPU, SQL statements and sqlite time per example, kB per trace, traces logged. Settings: no-mlflow;
traces-off; default (the project's bulk writer: traces held, then written once with their assessments); mlflow-async
(MLflow's exporter, spans written as they end, one writer off the threads, assessments one by one: the project
before 2026-11-28); mlflow-sync (the same, each thread writing). --cached: every LM call from DSPy's cache (target:
traced <= 5x traces-off, one trace per example).

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

SETTINGS = ("no-mlflow", "traces-off", "default", "mlflow-async", "mlflow-sync")
ENVIRONMENT = {"mlflow-sync": {"MLFLOW_ENABLE_ASYNC_TRACE_LOGGING": "false"},
               "mlflow-async": {"MLFLOW_ENABLE_ASYNC_TRACE_LOGGING": "true",
                                "MLFLOW_ASYNC_TRACE_LOGGING_MAX_WORKERS": "1"}}


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
    from pipelines.evaluation.scoring import evaluate

    store = common.scratch("trace-cost")
    common.isolate_mlflow(store)
    os.environ.update(ENVIRONMENT.get(args.setting, {}))
    extra = ["tracking.log_traces=false"] * (args.setting == "traces-off") + ["lm.cache=true"] * args.cached
    dspy.configure_cache(disk_cache_dir=str(store / "dspy-cache"))
    cfg, program, metric = common.cot_judged(args.api_base, store, *extra)
    devset, n = common.examples(args.examples), args.examples
    traced = args.setting not in ("no-mlflow", "traces-off")
    stats, samples, run, size = collections.Counter(), [], contextlib.nullcontext(), 0
    if args.setting != "no-mlflow":
        import mlflow

        from pipelines import tracking
        from pipelines.tracking import trace_export
        from pipelines.tracking.traces import annotate_traces, count_traces, held, last_trace_id

        if args.setting.startswith("mlflow"):
            trace_export.install = lambda: None  # keep MLflow's own exporter
        stats = sql_counter()
        tracking.setup(cfg)
        run = tracking.run("bench-trace-cost", cfg)
    trace_id = last_trace_id if traced else None

    def scored(devset):  # as the project's steps do: traces held (default) until their assessments are known
        with held() if traced else contextlib.nullcontext():
            result = evaluate(program, devset, metric, num_threads=args.threads, progress=False, trace_id=trace_id)
            evaluated = time.perf_counter()
            if traced:
                annotate_traces(result)
                mlflow.flush_trace_async_logging()
        return result, evaluated

    with run as active:
        count = (lambda: count_traces(active.info.run_id)) if traced else (lambda: 0)
        scored(devset if args.cached else devset[:4])  # warm-up: imports, the first traces; --cached fills the cache
        for _ in range(args.evals):
            before = count()
            stats.clear()
            wall, cpu = time.perf_counter(), time.process_time()
            result, evaluated = scored(devset)
            samples.append({"wall": time.perf_counter() - wall, "eval": evaluated - wall,
                            "cpu": (time.process_time() - cpu) / n, "stmts": stats["statements"] / n,
                            "sql_s": stats["seconds"] / n, "traces": count() - before})
        if traced:
            size = len(mlflow.get_trace(result.rows[0]["trace_id"]).to_json())
    assert args.setting != "no-mlflow" or "mlflow" not in sys.modules
    medians = {k: common.median([s[k] for s in samples]) for k in samples[0]}
    return {**medians, "traces": min(s["traces"] for s in samples), "bytes": size}


def main(args) -> None:
    rows, base = [], None
    with common.fake_lm(latency=args.latency) as (api_base, _):
        for setting in args.settings:
            r = common.spawn_worker(args, setting=setting, api_base=api_base)
            base = r["wall"] if setting == "traces-off" else base
            traced = setting not in SETTINGS[:2]
            rows.append([setting, f"{r['wall']:.2f} ({r['eval']:.2f})", f"{r['wall'] / base:.2f}x" if base else "-",
                         f"{r['cpu'] * 1000:.0f}", f"{r['stmts']:.0f}", f"{r['sql_s'] * 1000:.0f}",
                         *([f"{r['bytes'] / 1000:.1f}", f"{r['traces']}/{args.examples}"] if traced else ["-", "-"])])
            print(rows[-1], file=sys.stderr)
    print(f"\nMachine: {common.machine()}; {args.examples} examples x (cot + judge), fake LM {args.latency * 1000:.0f} "
          f"ms, {'all calls cached, ' * args.cached}{args.threads} threads, medians of {args.evals} evaluations "
          "after warm-up\n")
    print(common.table(["setting", "wall s until stored (eval)", "vs traces-off", "CPU ms/example",
                        "SQL stmts/example", "ms in sqlite/example", "kB/trace", "traces logged"], rows))


if __name__ == "__main__":
    cli = common.parser(__doc__, examples=16, threads=2, latency=0.05, evals=4, cached=False)
    cli.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    common.run_script(cli, main, worker)
