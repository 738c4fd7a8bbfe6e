"""Harness overhead: `pipelines.steps.variant.run_variant` versus a bare `dspy.Evaluate` loop (BENCHMARKS.md, 1 and 6).

Each arm in a fresh process, same program (cot, rag), dev examples, LM (the fake, uncached, or --lm local: the
embedded SmolLM2 server, private, gone when the script ends), adapter, judge and threads; the bare arm never
imports MLflow, a third arm runs the project with traces off. Medians of --reps runs after a warm-up: the
evaluation (the run's own `time_evaluate_s`, here until its traces are stored; target <= 1.05x bare) and the
fixed cost around it (the run's other `time_<phase>_s`; LiteLLM's first import is paid before, and shown apart).

    .venv/bin/python bench/overhead.py [--reps 3] [--dev 16] [--threads 2] [--latency 0.05] [--server]
    .venv/bin/python bench/overhead.py --lm local --programs cot --dev 8 --reps 1   # real LM, slow
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

T_START = time.perf_counter()

import dspy  # noqa: E402

import _common as common  # noqa: E402

MODES = ("project", "bare", "project-notrace")
PHASES = ["index", "evaluate", "log_model", "register"]  # the run's time_<phase>_s
FIXED = ["compose", "litellm_init", "index", "log_model", "register", "other"]


def compose(args, *extra: str):
    from pipelines.config import compose

    sizes = [f"data.dev_size={args.dev}", "data.test_size=1", f"num_threads={args.threads}", *extra]
    return compose(args.program, common.fake_overrides(args.api_base, Path(args.store) / "artifacts", *sizes,
                                                       fake=args.lm == "fake"))


def warm_litellm(cfg) -> float:
    """One schema-constrained call before any tracing is set up, timed: plain calls go through DSPy's
    native engine, the first `response_format` call imports LiteLLM (once per process)."""
    from pipelines.lm import build_adapter, build_lm

    with dspy.context(lm=build_lm(cfg.lm), adapter=build_adapter(cfg.lm)):
        return common.timed(dspy.Predict("question -> response"), question="warm up")[1]


def worker_project(args) -> dict:
    common.isolate_mlflow(Path(args.store))
    import mlflow

    from pipelines.steps import session, variant

    times = {"imports": time.perf_counter() - T_START}
    build_embedder = session.build_embedder

    def loaded_embedder(embedder_cfg):  # the model loads in the index phase, not in the first evaluation
        embedder = build_embedder(embedder_cfg)
        embedder(["warm up"])
        return embedder

    session.build_embedder = loaded_embedder  # time_evaluate_s runs until the traces are stored
    cfg, times["compose"] = common.timed(compose, args, *["tracking.log_traces=false"] * (args.mode != "project"))
    times["litellm_init"] = warm_litellm(cfg)
    result, times["run_variant"] = common.timed(variant.run_variant, cfg)
    phases = common.phase_times(mlflow.get_run(result.run_id))
    if missing := {"evaluate", "log_model", "register"} - set(phases):
        raise SystemExit(f"the run logged no time_<phase>_s for {sorted(missing)}; update bench/overhead.py")
    times.update({p: phases.get(p, 0.0) for p in PHASES})
    times["other"] = times["run_variant"] - sum(times[p] for p in PHASES)
    return {"times": times, "score": result.score}


def worker_bare(args) -> dict:
    common.isolate_mlflow(Path(args.store))  # only for RAGQA_CACHE_DIR (the same index cache)
    from pipelines.data import load_corpus, load_splits
    from pipelines.evaluation.judge import JudgedF1
    from pipelines.lm import build_adapter, build_lm
    from pipelines.programs import build_program
    from pipelines.retrieval.cache import load_or_build_index
    from pipelines.retrieval.embedders import build_embedder
    from pipelines.retrieval.retriever import Retriever

    times = {"imports": time.perf_counter() - T_START}
    cfg = compose(args)
    lm = build_lm(cfg.lm)
    dspy.configure(lm=lm, adapter=build_adapter(cfg.lm))
    times["litellm_init"] = warm_litellm(cfg)
    retriever = None
    if args.program == "rag":
        embedder = build_embedder(cfg.embedder)
        built = load_or_build_index(load_corpus(cfg.data), embedder, cfg.embedder, cfg.program.max_characters,
                                    Path(cfg.paths.cache) / "index",
                                    brute_force_threshold=int(cfg.program.brute_force_threshold))
        retriever = Retriever(built.index, embedder, k=int(cfg.program.k))
        retriever.embedder(["warm up"])
    evaluate = dspy.Evaluate(devset=load_splits(cfg.data).dev, metric=JudgedF1(lm), num_threads=args.threads)
    result, times["evaluate"] = common.timed(evaluate, build_program(cfg.program, cfg.lm, retriever))
    assert "mlflow" not in sys.modules, "the bare arm must not import MLflow"
    return {"times": times, "score": float(result.score)}


def main(args) -> None:
    base, report = common.scratch("overhead"), {}
    with contextlib.ExitStack() as stack:
        if args.server:
            stack.enter_context(common.team_server(base))
        if args.lm == "local":  # our own embedded server, gone once this script has ended
            api_base, counts = common.private_server(base / "server"), lambda: (0, 0)
        else:
            api_base, counts = stack.enter_context(common.fake_lm(latency=args.latency))
        for program in args.programs:
            (base / program).mkdir()
            report[program] = {mode: [] for mode in MODES}
            for rep in range(args.reps + 1):  # rep 0: warm-up (store creation, index build, disk cache)
                for mode in MODES:
                    before = counts()[0]
                    out = common.spawn_worker(args, mode=mode, program=program, store=str(base / program),
                                              api_base=api_base)
                    out["calls"] = counts()[0] - before - 1  # minus the warm-up call
                    print(f"{program:4} {mode:8} rep {rep}: eval {out['times']['evaluate']:.3f} s, "
                          f"{out['calls']} LM calls", file=sys.stderr)
                    if rep:
                        report[program][mode].append(out)
    lm = "embedded SmolLM2 (lm=local, uncached)" if args.lm == "local" else f"fake LM {args.latency * 1000:.0f} ms"
    print(f"\nMachine: {common.machine()}; {lm}, dev={args.dev}, num_threads={args.threads}, medians of {args.reps} "
          f"runs, tracking to {'a team server (PostgreSQL, basic-auth)' if args.server else 'sqlite'}; "
          f"scratch {base}\n")
    med = {p: {m: {k: common.median([r["times"][k] for r in runs[m]]) for k in runs[m][0]["times"]} for m in MODES}
           for p, runs in report.items()}
    evals, fixed = [], []
    for p, runs in report.items():
        t, b, notrace = med[p]["project"], med[p]["bare"], med[p]["project-notrace"]["evaluate"]
        calls = runs["project"][0]["calls"] if args.lm == "fake" else "-"
        ideal = f"{calls * args.latency / args.threads:.2f}" if args.lm == "fake" else "-"
        ratio = t["evaluate"] / b["evaluate"]
        evals.append([p, calls, ideal, f"{b['evaluate']:.3f}", f"{t['evaluate']:.3f}", f"{ratio:.2f}x",
                      f"{notrace:.3f} ({notrace / b['evaluate']:.2f}x)",
                      f"{(t['evaluate'] - b['evaluate']) / args.dev * 1000:.0f}", "met" if ratio <= 1.05 else "MISSED"])
        fixed.append([p, f"{t['imports']:.2f} ({b['imports']:.2f})", f"{b['litellm_init']:.2f}",
                      f"{t['compose'] + t['litellm_init'] + t['run_variant'] - t['evaluate']:.2f}",
                      *[f"{t[n]:.2f}" for n in FIXED]])
    print("Evaluation phase (s)")
    print(common.table(["program", "LM calls", "ideal", "bare dspy.Evaluate", "project evaluate()", "ratio",
                        "project, traces off", "extra ms/example", "target <= 1.05x"], evals))
    print("\nFixed cost outside the eval phase (s, medians; 'fixed total' = compose + litellm_init + run_variant -"
          " evaluate; index, log_model, register: the run's time_<phase>_s)")
    print(common.table(["program", "imports (bare)", "bare litellm_init", "fixed total", *FIXED], fixed))


if __name__ == "__main__":
    cli = common.parser(__doc__, reps=3, dev=16, threads=2, latency=0.05, server=False)
    cli.add_argument("--lm", choices=["fake", "local"], default="fake")
    cli.add_argument("--programs", nargs="+", choices=["cot", "rag"], default=["cot", "rag"])
    common.run_script(cli, main, lambda args: (worker_bare if args.mode == "bare" else worker_project)(args))
