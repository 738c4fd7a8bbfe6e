"""Evaluation concurrency: wall time of `pipelines.scoring.evaluate` versus the ideal (BENCHMARKS.md, 2 and 6).

cot + JudgedF1 (2 LM calls per example) against the fake LM at --latency per call, for each --threads; ideal
= calls counted by the fake x latency / threads. In one process, after a warm-up each: no-mlflow, then the
harness (inside a run after `tracking.setup`, traces on, timed until they are stored). Target: wall <= 1.3x
ideal at 16 threads. --server logs to a team server (PostgreSQL + basic-auth `mlflow server`).

    .venv/bin/python bench/concurrency.py [--examples 64] [--latency 0.1] [--threads 1 4 16] [--server]
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import _common as common


def main(args) -> None:
    store, rows = common.scratch("concurrency"), []
    with common.team_server(store) if args.server else contextlib.nullcontext(), \
            common.fake_lm(latency=args.latency) as (api_base, counts):
        common.isolate_mlflow(store)
        from pipelines.scoring import evaluate

        devset = common.examples(args.examples)
        cfg, program, metric = common.cot_judged(api_base, store)

        def measure(setting: str) -> None:
            evaluate(program, devset[:4], metric, 4, progress=False)  # warm-up: imports, first calls
            for threads in args.threads:
                before, t = counts()[0], time.perf_counter()
                result = evaluate(program, devset, metric, threads, progress=False)
                if "mlflow" in sys.modules:  # traces are exported off the threads: done when they are stored
                    sys.modules["mlflow"].flush_trace_async_logging()
                wall, calls = time.perf_counter() - t, counts()[0] - before
                ideal = calls * args.latency / threads
                print(f"{setting} threads={threads}: {wall:.2f} s, {calls} calls, failed {result.failed}",
                      file=sys.stderr)
                rows.append([setting, threads, calls, f"{ideal:.2f}", f"{wall:.2f}", f"{wall / ideal:.2f}x",
                             ("met" if wall / ideal <= 1.3 else "MISSED") if threads == 16 else ""])

        measure("no-mlflow")
        assert "mlflow" not in sys.modules
        from pipelines import tracking

        tracking.setup(cfg)
        with tracking.run("bench-concurrency", cfg):
            measure("harness")
    where = f"tracking server {os.environ[common.SERVER_URI]} (PostgreSQL)" if args.server else "sqlite"
    print(f"\nMachine: {common.machine()}; {args.examples} examples, fake LM {args.latency * 1000:.0f} ms/call, "
          f"cot + JudgedF1, {where}; scratch {store}\n")
    print(common.table(["setting", "num_threads", "LM calls", "ideal s", "wall s", "wall/ideal", "target <= 1.3x @16"],
                       rows))


if __name__ == "__main__":
    cli = common.parser(__doc__, examples=64, latency=0.1, server=False)
    cli.add_argument("--threads", type=int, nargs="+", default=[1, 4, 16])
    main(cli.parse_args())
