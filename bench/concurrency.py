"""Evaluation concurrency: wall time of `pipelines.scoring.evaluate` versus the ideal.

64 examples through the cot program, scored by `JudgedF1` (1 program call + 1 judge call per
example), against the fake LM server (tests/fake_lm.py, a ThreadingHTTPServer) at 100 ms per
call (run in its own process, so its Python work does not take the client's GIL), for
num_threads 1, 4 and 16. ideal = LM calls x latency / threads, the calls counted by
the server. Two settings, in one process, each after a small warm-up:
  * no-mlflow: `evaluate` alone, as `dspy.Evaluate` runs it (no MLflow imported yet);
  * harness:   the same inside an MLflow run after `pipelines.tracking.setup` (DSPy autolog
               tracing on, as every project step runs it).
Target: wall <= 1.3x ideal at 16 threads.

    .venv/bin/python bench/concurrency.py [--examples 64] [--latency 0.1] [--threads 1 4 16] [--server]

With --server the runs go to a team server (PostgreSQL + basic-auth `mlflow server`, deploy/team_server.py).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

from _common import (
    SERVER_URI,
    ServerProcess,
    examples,
    fake_overrides,
    isolate_mlflow,
    machine,
    parser,
    scratch,
    table,
    team_server,
)


def main(args) -> None:
    store = scratch("concurrency")
    with team_server(store) if args.server else contextlib.nullcontext():
        measure_all(args, store)


def measure_all(args, store) -> None:
    isolate_mlflow(store)
    import dspy

    from pipelines.config import compose
    from pipelines.lm import build_adapter, build_lm
    from pipelines.scoring import JudgedF1, Scorer, Scoring, evaluate

    devset = examples(args.examples)
    rows = []
    with ServerProcess("fake", latency=args.latency) as fake:
        cfg = compose("cot", fake_overrides(fake.api_base, store / "artifacts"))
        lm, adapter = build_lm(cfg.lm), build_adapter(cfg.lm)
        dspy.configure(lm=lm, adapter=adapter)
        metric = Scorer(Scoring.from_cfg(cfg.scoring), JudgedF1(lm))
        program = dspy.ChainOfThought("question -> response")

        def measure(setting: str) -> None:
            evaluate(program, devset[:4], metric, 4, progress=False)  # warm-up: imports, first calls
            for threads in args.threads:
                before, t = fake.calls, time.perf_counter()
                result = evaluate(program, devset, metric, threads, progress=False)
                if "mlflow" in sys.modules:  # traces are exported off the threads: done when they are stored
                    sys.modules["mlflow"].flush_trace_async_logging()
                wall, calls = time.perf_counter() - t, fake.calls - before
                ideal = calls * args.latency / threads
                print(f"{setting} threads={threads}: {wall:.2f} s, {calls} calls, failed {result.failed}",
                      file=sys.stderr)
                rows.append([setting, threads, calls, f"{ideal:.2f}", f"{wall:.2f}", f"{wall / ideal:.2f}x",
                             ("met" if wall / ideal <= 1.3 else "MISSED") if threads == 16 else ""])

        measure("no-mlflow")
        assert "mlflow" not in sys.modules
        import mlflow

        from pipelines import tracking

        tracking.setup(cfg)
        with tracking.run("bench-concurrency", cfg):
            measure("harness")
        mlflow.dspy.autolog(disable=True)
    where = f"tracking server {os.environ[SERVER_URI]} (PostgreSQL)" if args.server else "sqlite"
    print(f"\nMachine: {machine()}; {args.examples} examples, fake LM {args.latency * 1000:.0f} ms/call, "
          f"cot + JudgedF1, {where}; scratch {store}\n")
    print(table(["setting", "num_threads", "LM calls", "ideal s", "wall s", "wall/ideal",
                 "target <= 1.3x @16"], rows))


if __name__ == "__main__":
    cli = parser(__doc__)
    cli.add_argument("--examples", type=int, default=64)
    cli.add_argument("--latency", type=float, default=0.1)
    cli.add_argument("--threads", type=int, nargs="+", default=[1, 4, 16])
    cli.add_argument("--server", action="store_true", help="log to a team server (deploy/team_server.py)")
    main(cli.parse_args())
