"""What the programs past the tutorial cost at tutorial size (BENCHMARKS.md, 8): rag, multihop (2 and 3 hops)
and ensembles (3 and 5 samples of the rag program) through `mlflow run`, `experiment=tutorial` against the
fake LM at 200 ms per call, uncached: jobs.py's synthetic corpus (28,436 documents) and examples (300 dev),
24 threads.

Per job: LM calls and tokens per question (the run's own metered figures), seconds per question (the mean
duration of its evaluation's traces: one question's wall time, its calls' latency included), evaluation
seconds for all 300, examples traced, peak RSS of the job, requests the fake served. Writes results.json.

    .venv/bin/python bench/programs.py                   # ~10-20 min on 2 cores
    .venv/bin/python bench/programs.py --docs 2000 --dev 60 --phases rag multihop2   # a quick look
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

import _common as common
import user_jobs
from synthetic import generate

MODEL = "ragqa-tech-tutorial"
PHASES = {  # name: (entry point, overrides); the ensembles sample the program the rag phase registered
    "rag": ("rag", []),
    "multihop2": ("multihop", ["program.hops=2"]),
    "multihop3": ("multihop", ["program.hops=3"]),
    "ensemble3": ("ensemble", [f"ensemble.samples_of=models:/{MODEL}/1", "ensemble.size=3"]),
    "ensemble5": ("ensemble", [f"ensemble.samples_of=models:/{MODEL}/1", "ensemble.size=5"]),
}


def run_phase(name: str, store: Path, api_base: str, counts, args) -> dict:
    entry, extra = PHASES[name]
    overrides = ["experiment=tutorial", f"lm.api_base={api_base}", f"embedder.api_base={api_base}", "lm.cache=false",
                 f"num_threads={args.threads}", f"data.dev_size={args.dev}", f"hydra.run.dir={store}/hydra-{name}",
                 *extra]
    chat0, _ = counts()
    record = {"phase": name, **user_jobs.run_job(name, user_jobs.mlflow_run(entry, overrides), store,
                                                 user_jobs.FAKE_ENV)}
    record["chat_calls"] = counts()[0] - chat0
    record.update(describe_run(store, record["start"]))
    return record


def describe_run(store: Path, since: float) -> dict:
    """The job's run: its metered cost per question, evaluation time, and its traces' mean duration."""
    mlflow.set_tracking_uri(common.sqlite_uri(store))
    client = MlflowClient()
    experiment = client.get_experiment_by_name(common.EXPERIMENT).experiment_id
    (run,) = client.search_runs([experiment], f"attributes.start_time >= {int(since * 1000)}", max_results=5)
    traces = mlflow.search_traces(locations=[experiment], run_id=run.info.run_id, include_spans=False,
                                  return_type="list")
    durations = [t.info.execution_duration / 1000 for t in traces if t.info.execution_duration is not None]
    metrics = run.data.metrics
    return {"status": run.info.status, "examples": int(metrics.get("num_examples", 0)), "traces": len(traces),
            "lm_calls_per_question": metrics.get("lm_calls_per_question"),
            "tokens_per_question": metrics.get("tokens_per_question"),
            "seconds_per_question": sum(durations) / len(durations) if durations else None,
            "evaluate_s": metrics.get("time_evaluate_s"), "primary": metrics.get("semantic_f1")}


def report(results: dict) -> str:
    rows = [[p["phase"], p["rc"], p["status"], p["examples"], p["traces"], f"{p['lm_calls_per_question']:.2f}",
             f"{p['tokens_per_question']:.0f}", f"{p['seconds_per_question']:.2f}", f"{p['evaluate_s']:.1f}",
             f"{p['wall_s']:.1f}", f"{p['peak_rss_mib']:.0f}", p["chat_calls"]] for p in results["phases"]]
    return "\n".join([f"Machine: {results['machine']}", f"Scratch: {results['store']}", "", common.table(
        ["job", "exit", "status", "examples", "traced", "LM calls / q", "tokens / q", "s / q (trace)",
         "evaluate s", "job wall s", "peak RSS MiB", "fake chat calls (judge incl.)"], rows)])


def main(args) -> None:
    store = Path(args.scratch) if args.scratch else common.scratch("programs")
    generate(store / "cache" / "data", args.docs, args.examples, args.seed)
    results = user_jobs.run_phases(store, args.phases, run_phase, args, latency=args.latency, score=0.7)
    results["machine"] = common.machine()
    (store / "results.json").write_text(json.dumps(results, indent=2))
    print(report(results))


if __name__ == "__main__":
    cli = common.parser(__doc__)
    cli.add_argument("--phases", nargs="+", choices=list(PHASES), default=list(PHASES), help="in this order")
    cli.add_argument("--docs", type=int, default=28_436, help="corpus documents")
    cli.add_argument("--examples", type=int, default=1_200, help="QA examples (the splits take 1,000)")
    cli.add_argument("--dev", type=int, default=300, help="dev examples evaluated")
    cli.add_argument("--seed", type=int, default=0, help="data generator seed")
    cli.add_argument("--latency", type=float, default=0.2, help="fake server seconds per chat request")
    cli.add_argument("--threads", type=int, default=24, help="num_threads")
    cli.add_argument("--scratch", help="reuse this dir (store, caches, data) instead of a fresh one")
    common.run_script(cli, main)
