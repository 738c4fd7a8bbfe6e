"""Harness overhead: `pipelines.steps.run_variant` versus a bare `dspy.Evaluate` loop.

Both arms run the same program (cot, rag) on the same dev examples, against the same fake
OpenAI-compatible LM (tests/fake_lm.py, fixed latency, uncached), with the same adapter
(json_schema), metric (`pipelines.scoring.JudgedF1`) and thread count. Each arm runs in its own
fresh process; the bare arm never imports MLflow.

Measured, medians of --reps runs after one discarded warm-up per arm:
  * evaluation phase: the run's own `time_evaluate_s` (the project's evaluation, MLflow DSPy autolog
    tracing on, plus building the result rows, here until its traces are stored) versus
    `dspy.Evaluate(...)(program)` alone.                               Target: ratio <= 1.05x.
  * fixed cost: the rest of `run_variant`, by the run's other phase timings (`time_<phase>_s`: index
    load with the embedding model's load, log_model, register); `other` is what none covers
    (prepare and store check, run + config, datasets, the evaluation's results and assessments).
One-off costs are kept out of both eval phases and reported as fixed cost instead: the LiteLLM
import on the first schema-constrained call (~4-5 s; one warm-up call before the run, both arms) and, for
rag, the embedding model load (right after the index load, in both arms). A third arm, the
project with `tracking.log_traces=false`, attributes the overhead to tracing.

    .venv/bin/python bench/overhead.py [--reps 3] [--dev 16] [--threads 2] [--latency 0.05] [--server]
    .venv/bin/python bench/overhead.py --lm local --programs cot --dev 8 --reps 1   # real LM, slow

With --lm local the same comparison runs against the embedded SmolLM2 server (started by this script
with a private state dir under its scratch dir, stopped at its end; `lm.cache=false`), i.e. with
realistic LM latency.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

T_START = time.perf_counter()

from _common import (  # noqa: E402
    ServerProcess,
    fake_overrides,
    isolate_mlflow,
    machine,
    median,
    parser,
    phase_times,
    run_script,
    scratch,
    spawn_worker,
    table,
    team_server,
)

MODES = ("project", "bare", "project-notrace")
FIXED = ["compose", "litellm_init", "index", "log_model", "register", "other"]


def overrides(args) -> list[str]:
    sizes = [f"data.dev_size={args.dev}", "data.test_size=1", f"num_threads={args.threads}"]
    if args.lm == "local":  # the embedded SmolLM2 server the parent started, uncached
        return [f"lm.api_base={args.api_base}", "lm.cache=false", f"tracking.artifact_location={args.store}/artifacts",
                *sizes]
    return fake_overrides(args.api_base, Path(args.store) / "artifacts", *sizes)


def warm_litellm(cfg) -> float:
    """One schema-constrained call before any tracing is set up, timed. Plain calls go through DSPy's
    native engine; the first `response_format` call imports LiteLLM (~4-5 s, once per process)."""
    import dspy

    from pipelines.lm import build_adapter, build_lm

    t = time.perf_counter()
    with dspy.context(lm=build_lm(cfg.lm), adapter=build_adapter(cfg.lm)):
        dspy.Predict("question -> response")(question="warm up")
    return time.perf_counter() - t


def worker_project(args) -> dict:
    isolate_mlflow(Path(args.store))
    import mlflow

    from pipelines import steps
    from pipelines.config import compose

    imports = time.perf_counter() - T_START
    build_embedder, evaluate = steps.build_embedder, steps.evaluate

    def loaded_embedder(embedder_cfg):  # the model loads inside the index phase, not in the first evaluation
        embedder = build_embedder(embedder_cfg)
        embedder(["warm up"])
        return embedder

    def evaluate_until_stored(*a, **kw):  # traces are exported off the threads: done when they are stored
        result = evaluate(*a, **kw)
        mlflow.flush_trace_async_logging()
        return result

    steps.build_embedder, steps.evaluate = loaded_embedder, evaluate_until_stored
    t = time.perf_counter()
    cfg = compose(args.program, overrides(args) + (["tracking.log_traces=false"] if args.mode == "project-notrace"
                                                   else []))
    times = {"imports": imports, "compose": time.perf_counter() - t, "litellm_init": warm_litellm(cfg)}
    t = time.perf_counter()
    result = steps.run_variant(cfg)
    times["run_variant"] = time.perf_counter() - t
    phases = phase_times(mlflow.get_run(result.run_id))
    missing = {"evaluate", "log_model", "register"} - set(phases)
    if missing:
        raise SystemExit(f"the run logged no time_<phase>_s for {sorted(missing)}; update bench/overhead.py")
    times.update({k: phases.get(k, 0.0) for k in ("index", "evaluate", "log_model", "register")})
    times["other"] = times["run_variant"] - sum(times[k] for k in ("index", "evaluate", "log_model", "register"))
    return {"times": times, "score": result.score, "run_id": result.run_id}


def worker_bare(args) -> dict:
    isolate_mlflow(Path(args.store))  # only for RAGQA_CACHE_DIR (the same index cache)
    import dspy

    from pipelines.config import compose
    from pipelines.data import load_corpus, load_splits
    from pipelines.lm import build_adapter, build_lm
    from pipelines.programs import build_program
    from pipelines.retrieval import Retriever, build_embedder, load_or_build_index
    from pipelines.scoring import JudgedF1

    times = {"imports": time.perf_counter() - T_START}
    cfg = compose(args.program, overrides(args))
    dev = load_splits(cfg.data).dev
    lm, adapter = build_lm(cfg.lm), build_adapter(cfg.lm)
    dspy.configure(lm=lm, adapter=adapter)
    times["litellm_init"] = warm_litellm(cfg)
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


def worker(args) -> dict:
    return (worker_bare if args.mode == "bare" else worker_project)(args)


def main(args) -> None:
    base = scratch("overhead")
    server = (ServerProcess("local", state_dir=str(base / "server")) if args.lm == "local"
              else ServerProcess("fake", latency=args.latency))
    with team_server(base) if args.server else contextlib.nullcontext(), server:
        report = {}
        for program in args.programs:
            store = base / program
            store.mkdir()
            runs = {mode: [] for mode in MODES}
            for rep in range(args.reps + 1):  # rep 0: warm-up (store creation, index build, disk cache)
                for mode in MODES:
                    before = server.calls
                    out = spawn_worker(args, mode=mode, program=program, store=str(store), api_base=server.api_base)
                    out["calls"] = server.calls - before - 1  # minus the warm-up call
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
    print("\nFixed cost outside the eval phase (s, medians; 'fixed total' = compose + litellm_init + run_variant -"
          " evaluate; index, log_model, register: the run's time_<phase>_s), plus process imports")
    rows = []
    for program, runs in report.items():
        med = {n: median([r["times"][n] for r in runs["project"]]) for n in ["imports", "run_variant", *FIXED]}
        fixed = med["compose"] + med["litellm_init"] + med["run_variant"] - evals[program, "project"]
        rows.append([program, f"{med['imports']:.2f}", f"{fixed:.2f}", *[f"{med[n]:.2f}" for n in FIXED]])
    print(table(["program", "imports", "fixed total", *FIXED], rows))
    print("\n(bare arm, s: " + ", ".join(
        f"{p} imports {median([r['times']['imports'] for r in runs['bare']]):.2f}, "
        f"litellm_init {median([r['times']['litellm_init'] for r in runs['bare']]):.2f}"
        for p, runs in report.items()) + ")")


if __name__ == "__main__":
    cli = parser(__doc__)
    cli.add_argument("--reps", type=int, default=3)
    cli.add_argument("--dev", type=int, default=16)
    cli.add_argument("--threads", type=int, default=2)
    cli.add_argument("--latency", type=float, default=0.05)
    cli.add_argument("--lm", choices=["fake", "local"], default="fake")
    cli.add_argument("--programs", nargs="+", choices=["cot", "rag"], default=["cot", "rag"])
    cli.add_argument("--server", action="store_true", help="log to a team server (deploy/team_server.py)")
    run_script(cli, main, worker)
