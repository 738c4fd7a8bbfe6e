"""Harness overhead: `pipelines.steps.run_variant` versus a bare `dspy.Evaluate` loop.

Both arms run the same program (cot, rag) on the same dev examples, against the same fake
OpenAI-compatible LM (tests/fake_lm.py, fixed latency, uncached), with the same adapter
(json_schema), metric (`pipelines.scoring.JudgedF1`) and thread count. Each arm runs in its own
fresh process; the bare arm never imports MLflow.

Measured, medians of --reps runs after one discarded warm-up per arm:
  * evaluation phase: the project's `pipelines.scoring.evaluate` call (wrapped inside the run:
    `dspy.Evaluate` with MLflow DSPy autolog tracing on, plus building the result rows) versus
    `dspy.Evaluate(...)(program)` alone.                               Target: ratio <= 1.05x.
  * fixed cost: everything else `run_variant` does (config, prepare/store setup, index load,
    run + params, datasets, tables, usage, `log_model`, registration), reported by phase.
One-off costs are kept out of both eval phases and reported as fixed cost instead: the LiteLLM
import on the first schema-constrained call (~4-5 s; one warm-up call before the run, both arms) and, for
rag, the embedding model load (right after the index load, in both arms). A third arm, the
project with `tracking.log_traces=false`, attributes the overhead to tracing.

    .venv/bin/python bench/overhead.py [--reps 3] [--dev 16] [--threads 2] [--latency 0.05] [--server]
    .venv/bin/python bench/overhead.py --lm local --programs cot --dev 8 --reps 1   # real LM, slow

With --lm local the same comparison runs against the embedded SmolLM2 server (started once by
this script with a private state dir, `lm.cache=false`), i.e. with realistic LM latency.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time

T_START = time.perf_counter()

from _common import ROOT, fake_overrides, isolate_mlflow, machine, median, scratch, table, team_server  # noqa: E402

MODES = ("project", "bare", "project-notrace")
PHASES = ["compose", "prepare", "index_load", "embedder_load", "log_config", "log_datasets", "log_index",
          "evaluate", "log_evaluation", "log_program", "register"]


def overrides(args, store):
    sizes = [f"data.dev_size={args.dev}", "data.test_size=1", f"num_threads={args.threads}"]
    if args.lm == "local":  # the embedded SmolLM2 server the parent started, uncached
        return [f"lm.api_base={args.api_base}", "lm.cache=false", f"tracking.artifact_location={store}/artifacts",
                *sizes]
    return fake_overrides(args.api_base, store / "artifacts", *sizes)


def timed(times: dict, name: str, fn):
    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            times[name] = times.get(name, 0.0) + time.perf_counter() - t
    return wrapper


def warm_litellm(cfg, times: dict) -> None:
    """One schema-constrained call before any tracing is set up. Plain calls go through DSPy's
    native engine; the first `response_format` call imports LiteLLM (~4-5 s, once per process)."""
    import dspy

    from pipelines.lm import build_adapter, build_lm

    t = time.perf_counter()
    with dspy.context(lm=build_lm(cfg.lm), adapter=build_adapter(cfg.lm)):
        dspy.Predict("question -> response")(question="warm up")
    times["litellm_init"] = time.perf_counter() - t


def worker_project(args) -> dict:
    isolate_mlflow(args.store)
    from pipelines import steps, tracking
    from pipelines.config import compose

    times: dict[str, float] = {"imports": time.perf_counter() - T_START}
    build_retriever = steps.build_retriever

    def build_and_warm(cfg):
        retriever, info = build_retriever(cfg)
        timed(times, "embedder_load", retriever.embedder)(["warm up"])
        return retriever, info

    steps.prepare = timed(times, "prepare", steps.prepare)
    steps.build_retriever = build_and_warm
    steps.load_or_build_index = timed(times, "index_load", steps.load_or_build_index)
    evaluate = steps.evaluate

    def evaluate_and_store(*a, **kw):  # traces are exported off the threads: done when they are stored
        result = evaluate(*a, **kw)
        tracking.mlflow.flush_trace_async_logging()
        return result

    steps.evaluate = timed(times, "evaluate", evaluate_and_store)
    for name in ("log_config", "log_datasets", "log_index", "log_evaluation", "log_program", "register"):
        setattr(tracking, name, timed(times, name, getattr(tracking, name)))
    extra = ["tracking.log_traces=false"] if args.worker == "project-notrace" else []
    cfg = timed(times, "compose", compose)(args.program, overrides(args, args.store) + extra)
    warm_litellm(cfg, times)
    t = time.perf_counter()
    result = steps.run_variant(cfg)
    times["run_variant"] = time.perf_counter() - t
    # A phase the step no longer calls through these names would silently count as "other".
    no_index = {"index_load", "embedder_load", "log_index"} if args.program == "cot" else set()
    missing = [p for p in PHASES if p not in times and p not in no_index]
    if missing:
        raise SystemExit(f"phases never timed: {missing}; update bench/overhead.py to the step's code")
    times["other"] = times["run_variant"] - sum(times.get(p, 0.0) for p in PHASES if p != "compose")
    return {"times": times, "score": result.score, "run_id": result.run_id}


def worker_bare(args) -> dict:
    isolate_mlflow(args.store)  # only for RAGQA_CACHE_DIR (the same index cache)
    from pathlib import Path

    import dspy

    from pipelines.config import compose
    from pipelines.data import load_corpus, load_splits
    from pipelines.lm import build_adapter, build_lm
    from pipelines.programs import build_program
    from pipelines.retrieval import Retriever, build_embedder, load_or_build_index
    from pipelines.scoring import JudgedF1

    times = {"imports": time.perf_counter() - T_START}
    cfg = compose(args.program, overrides(args, args.store))
    dev = load_splits(cfg.data).dev
    lm, adapter = build_lm(cfg.lm), build_adapter(cfg.lm)
    dspy.configure(lm=lm, adapter=adapter)
    warm_litellm(cfg, times)
    retriever = None
    if args.program == "rag":
        embedder = build_embedder(cfg.embedder)
        built = load_or_build_index(load_corpus(cfg.data), embedder, cfg.embedder, cfg.program.max_characters,
                                    Path(cfg.paths.cache) / "index",
                                    brute_force_threshold=int(cfg.program.brute_force_threshold))
        retriever = Retriever(built.index, embedder, k=int(cfg.program.k))
        retriever.embedder(["warm up"])
    program = build_program(cfg.program, cfg.lm, retriever)
    t = time.perf_counter()
    result = dspy.Evaluate(devset=dev, metric=JudgedF1(lm), num_threads=args.threads)(program)
    times["evaluate"] = time.perf_counter() - t
    assert "mlflow" not in sys.modules, "the bare arm must not import MLflow"
    return {"times": times, "score": float(result.score)}


def spawn(args, mode: str, program: str, store) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--program", program, "--api-base", args.api_base,
           "--store", str(store), "--dev", str(args.dev), "--threads", str(args.threads), "--lm", args.lm]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode}/{program} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class LocalServer:
    """The embedded llama.cpp server (lm=local), started with a private state dir; no call counter."""

    calls = 0

    def __init__(self, state_dir):
        from pipelines.config import compose
        from pipelines.server import ensure_server

        self.api_base = ensure_server({**compose("config").lm.server, "state_dir": str(state_dir)})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        from pipelines.server import stop_owned_servers

        stop_owned_servers()


def main(args) -> None:
    from fake_lm import FakeLM

    base = scratch("overhead")
    server = LocalServer(base / "server") if args.lm == "local" else FakeLM(latency=args.latency, mode="ok")
    with team_server(base) if args.server else contextlib.nullcontext(), server as fake:
        args.api_base = fake.api_base
        report = {}
        for program in args.programs:
            store = base / program
            store.mkdir()
            runs = {mode: [] for mode in MODES}
            for rep in range(args.reps + 1):  # rep 0: warm-up (store creation, index build, disk cache)
                for mode in MODES:
                    before = fake.calls
                    out = spawn(args, mode, program, store)
                    out["calls"] = fake.calls - before - 1  # minus the warm-up call
                    print(f"{program:4} {mode:8} rep {rep}: eval {out['times']['evaluate']:.3f} s, "
                          f"{out['calls']} LM calls", file=sys.stderr)
                    if rep:
                        runs[mode].append(out)
            report[program] = runs
    lm = ("embedded SmolLM2 (lm=local, uncached)" if args.lm == "local"
          else f"fake LM latency {args.latency * 1000:.0f} ms")
    where = "a team server (PostgreSQL, basic-auth)" if args.server else "sqlite"
    print(f"\nMachine: {machine()}; {lm}, dev={args.dev}, "
          f"num_threads={args.threads}, medians of {args.reps} runs, tracking to {where}; scratch {base}\n")
    evals = {(p, m): median([r["times"]["evaluate"] for r in runs[m]]) for p, runs in report.items() for m in MODES}
    rows = []
    for program, runs in report.items():
        bare, proj, notrace = (evals[program, m] for m in ("bare", "project", "project-notrace"))
        calls = runs["project"][0]["calls"]
        ratio = proj / bare
        ideal = "-" if args.lm == "local" else f"{calls * args.latency / args.threads:.2f}"
        rows.append([program, calls if args.lm == "fake" else "-", ideal, f"{bare:.3f}", f"{proj:.3f}",
                     f"{ratio:.2f}x", f"{notrace:.3f} ({notrace / bare:.2f}x)",
                     f"{(proj - bare) / args.dev * 1000:.0f}", "met" if ratio <= 1.05 else "MISSED"])
    print("Evaluation phase (s)")
    print(table(["program", "LM calls", "ideal", "bare dspy.Evaluate", "project evaluate()", "ratio",
                 "project, traces off", "extra ms/example", "target <= 1.05x"], rows))
    print("\nFixed cost of run_variant outside the eval phase (s, medians; 'fixed total' = compose +"
          " litellm_init + run_variant - evaluate), plus process imports")
    names = ["compose", "litellm_init", *[p for p in PHASES if p not in ("compose", "evaluate")], "other"]
    rows = []
    for program, runs in report.items():
        med = {n: median([r["times"].get(n, 0.0) for r in runs["project"]])
               for n in ["imports", "run_variant", *names]}
        fixed = med["compose"] + med["litellm_init"] + med["run_variant"] - evals[program, "project"]
        rows.append([program, f"{med['imports']:.2f}", f"{fixed:.2f}", *[f"{med[n]:.2f}" for n in names]])
    print(table(["program", "imports", "fixed total", *names], rows))
    print("\n(bare arm, s: " + ", ".join(
        f"{p} imports {median([r['times']['imports'] for r in runs['bare']]):.2f}, "
        f"litellm_init {median([r['times']['litellm_init'] for r in runs['bare']]):.2f}"
        for p, runs in report.items()) + ")")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dev", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--lm", choices=["fake", "local"], default="fake")
    parser.add_argument("--programs", nargs="+", choices=["cot", "rag"], default=["cot", "rag"])
    parser.add_argument("--server", action="store_true", help="log to a team server (deploy/team_server.py)")
    parser.add_argument("--worker", choices=MODES)
    parser.add_argument("--program", choices=["cot", "rag"], default="cot")
    parser.add_argument("--api-base")
    parser.add_argument("--store")
    args = parser.parse_args()
    if args.worker:
        from pathlib import Path

        args.store = Path(args.store)
        worker = worker_bare if args.worker == "bare" else worker_project
        print(json.dumps(worker(args)))
    else:
        main(args)
