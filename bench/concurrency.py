"""Concurrency against the fake LM at --latency per call (BENCHMARKS.md, 2, 6 and 7). Evaluation: wall time of
`pipelines.evaluation.scoring.evaluate` (cot + JudgedF1: 2 calls per example) per --threads versus the ideal
(calls x latency / threads), without MLflow, then in a run with traces stored (target: <= 1.3x at 16 threads;
--server: a team server).
--predict: rows/s of a logged cot program over --examples questions at num_threads=--threads[0], (a) in one process
(pyfunc), (b) `predict` on local Spark, (c) on a 2-worker standalone cluster on loopback; and what a fresh Python
worker pays to import the project and load the program.

    .venv/bin/python bench/concurrency.py [--examples 64] [--latency 0.1] [--threads 1 4 16] [--server]
    .venv/bin/python bench/concurrency.py --predict --examples 1000 --latency 0.2 --threads 8
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import _common as common
from helpers import spark_cluster

LOAD = ("import sys, time; t = time.time(); import mlflow; mlflow.pyfunc.load_model(sys.argv[1]); "
        "print(time.time() - t)")


def evaluation(args, api_base, counts, store) -> None:
    from pipelines.evaluation.scoring import evaluate

    devset, rows = common.examples(args.examples), []
    cfg, program, metric = common.cot_judged(api_base, store)

    def measure(setting: str) -> None:
        evaluate(program, devset[:4], metric, num_threads=4, progress=False)  # warm-up: imports, first calls
        for threads in args.threads:
            before, t = counts()[0], time.perf_counter()
            with held() if "mlflow" in sys.modules else contextlib.nullcontext():  # until stored
                result = evaluate(program, devset, metric, num_threads=threads, progress=False)
            wall, calls = time.perf_counter() - t, counts()[0] - before
            ideal = calls * args.latency / threads
            print(f"{setting} threads={threads}: {wall:.2f} s, {calls} calls, failed {result.failed}", file=sys.stderr)
            rows.append([setting, threads, calls, f"{ideal:.2f}", f"{wall:.2f}", f"{wall / ideal:.2f}x",
                         ("met" if wall / ideal <= 1.3 else "MISSED") if threads == 16 else ""])

    measure("no-mlflow")
    assert "mlflow" not in sys.modules
    from pipelines import tracking
    from pipelines.tracking.traces import held

    tracking.setup(cfg)
    with tracking.run("bench-concurrency", cfg):
        measure("harness")
    print(common.table(["setting", "num_threads", "LM calls", "ideal s", "wall s", "wall/ideal", "target <= 1.3x @16"],
                       rows))


def prediction(args, api_base, store) -> None:
    import mlflow
    import pandas as pd

    from pipelines.config import compose
    from pipelines.steps.variant import run_variant

    threads = args.threads[0]
    cfg = compose("cot", common.fake_overrides(api_base, store / "artifacts", f"num_threads={threads}"))
    uri = f"models:/{cfg.tracking.registered_model}/{run_variant(cfg).version}"
    questions = pd.DataFrame({"id": range(args.examples), "question": [e.question for e in common.examples(
        args.examples)]})
    questions.to_json(store / "questions.jsonl", orient="records", lines=True)
    fresh = subprocess.run([sys.executable, "-c", LOAD, uri], capture_output=True, text=True, check=True, cwd=store)
    answers, seconds = common.timed(mlflow.pyfunc.load_model(uri).predict, questions[["question"]],
                                    params={"num_threads": threads})
    assert (answers["error"] == "").all()
    rows = [["(a) one process, pyfunc", 1, f"{seconds:.1f}", f"{args.examples / seconds:.1f}"]]

    def job(name: str, *extra: str) -> None:
        output = store / f"predictions-{len(rows)}"
        subprocess.run([sys.executable, "-m", "pipelines.predict", f"model_uri={uri}",
                        f"input={store / 'questions.jsonl'}", f"output={output}",
                        f"tracking.artifact_location={store}/artifacts", *extra],
                       cwd=common.ROOT, check=True, capture_output=True)
        (run,) = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.output = '{output}'",
                                    output_format="list")
        m = run.data.metrics
        rows.append([name, int(m["executors"]), f"{m['time_predict_s']:.1f}", f"{m['rows_per_second']:.1f}"])

    job("(b) predict, local[*]")
    with spark_cluster(store / "cluster") as master:
        job("(c) predict, standalone, 2 workers", "spark=standalone", f"spark.master={master}",
            "+spark.conf.driver.host=127.0.0.1", "+spark.conf.driver.bindAddress=127.0.0.1")
    print(f"One process at most {threads / args.latency:.0f} rows/s; loading the program: "
          f"{float(fresh.stdout.split()[-1]):.1f} s in a fresh Python worker (imports included)\n")
    print(common.table(["arm", "executors", "predict s", "rows/s"], rows))


def main(args) -> None:
    store = common.scratch("concurrency")
    with common.team_server(store) if args.server else contextlib.nullcontext(), \
            common.fake_lm(latency=args.latency) as (api_base, counts):
        common.isolate_mlflow(store)
        where = f"tracking server {os.environ[common.SERVER_URI]} (PostgreSQL)" if args.server else "sqlite"
        print(f"\nMachine: {common.machine()}; {args.examples} examples, fake LM {args.latency * 1000:.0f} ms/call, "
              f"{where}; scratch {store}\n")
        prediction(args, api_base, store) if args.predict else evaluation(args, api_base, counts, store)


if __name__ == "__main__":
    cli = common.parser(__doc__, examples=64, latency=0.1, server=False, predict=False)
    cli.add_argument("--threads", type=int, nargs="+", default=[1, 4, 16])
    main(cli.parse_args())
