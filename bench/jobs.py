"""Whole jobs through `mlflow run`, timed by phase, each run by its own `time_<phase>_s` (BENCHMARKS.md, 4 and 5).

readme: the README's main command (`mlflow run . --env-manager local --experiment-name ragqa-arena-tech`) on the
  embedded stack with cold caches and its own llama.cpp server (a fresh RAGQA_SERVER_DIR, so its start is
  measured; timed alone first, in a worker process it dies with). Target: <= 15 min.
The tutorial preset at full size against a fake server: a seeded synthetic corpus (28,436 documents) and 1,200
  examples where `data=ragqa_arena_tech` finds them, chat and embeddings from tests/fake_lm.py (judge score 0.7,
  1.0 for answers given with demos), each `experiment=tutorial` on one store and cache: rag (cold), optimize,
  main, rag-cached (all from DSPy's cache), rag-untraced (tracking.log_traces=false), and bare: DSPy's RAG tutorial
  (https://dspy.ai/tutorials/rag/) as a plain script (bench/bare_tutorial.py: no MLflow, no project code), cold cache.
Per phase: wall time, peak RSS, requests to the fake, store size; per run: its start and end within the phase,
phase timings, examples evaluated, traces stored; the registered MIPROv2 programs' demos. Writes results.json.

    .venv/bin/python bench/jobs.py --phases readme     # ~10-15 min
    .venv/bin/python bench/jobs.py                     # the tutorial phases, 15-30 min on 2 cores
    .venv/bin/python bench/jobs.py --docs 2000 --auto light --phases rag optimize   # a quick look
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

import _common as common
import user_jobs
from bare_tutorial import bare_tutorial
from synthetic import generate

PHASES = ("rag", "optimize", "main", "rag-cached", "rag-untraced", "bare")  # the tutorial's, in this order
ENTRY = {"readme": "main", "rag": "rag", "optimize": "optimize", "main": "main", "rag-cached": "rag",
         "rag-untraced": "rag"}

# Running and measuring the phases ----------------------------------------------------------------------------


PHASE_COLUMNS = ["run s", "index s (before the run)", "eval s (optimize: baseline)", "MIPROv2 compile s",
                 "optimized eval s", "log model s", "register s", "rest of the run s"]


def phase_cells(t: dict[str, float]) -> list[str]:
    """A run's `phase_times` under PHASE_COLUMNS, "—" where it has none."""
    first = "baseline_evaluate" if "baseline_evaluate" in t else "evaluate"
    values = [t.get("run"), t.get("index"), t.get(first), t.get("compile"), t.get("evaluate") if first != "evaluate"
              else None, t.get("log_model"), t.get("register"), t.get("other")]
    return ["—" if v is None else f"{v:.1f}" for v in values]


def phase_command(phase: str, store: Path, api_base: str, args) -> list[str]:
    if phase == "bare":
        spec = {"bare": str(store), "api_base": api_base, "threads": args.threads, "auto": args.auto}
        return [sys.executable, str(Path(__file__).resolve()), "--worker-args", json.dumps(spec)]
    tutorial = ["experiment=tutorial", f"lm.api_base={api_base}", f"embedder.api_base={api_base}",
                f"num_threads={args.threads}", f"optimizer.auto={args.auto}"] * (phase != "readme")
    untraced = ["tracking.log_traces=false"] * (phase == "rag-untraced")
    return user_jobs.mlflow_run(ENTRY[phase], [*tutorial, f"hydra.run.dir={store}/hydra-{phase}", *untraced,
                                               *args.extra])


def run_phase(phase: str, store: Path, api_base: str, counts, args) -> dict:
    from pipelines.server import running_servers

    record = {"phase": phase}
    if phase == "readme":  # the embedded server's start alone, then the job with its own
        record["server_alone_s"] = common.spawn_worker(args, state_dir=str(store / "server-alone"))["seconds"]
        record["other_servers"] = [f"{s['process']} at {s['api_base']}" for s in running_servers()]
    chat0, emb0 = counts()
    cmd = phase_command(phase, store, api_base, args)
    env = {"PYTHONDONTWRITEBYTECODE": "1",
           **({"RAGQA_SERVER_DIR": str(store / "server")} if phase == "readme" else user_jobs.FAKE_ENV)}
    record.update(user_jobs.run_job(phase, cmd, store, env), cmd=" ".join(cmd))
    chat1, emb1 = counts()
    files = [store / "mlflow.db", *(p for p in (store / "artifacts").rglob("*") if p.is_file())]
    record.update(chat_calls=chat1 - chat0, embedding_calls=emb1 - emb0,
                  store_mib=sum(p.stat().st_size for p in files if p.exists()) / 2**20)
    if phase == "bare":
        record["bare"] = json.loads((store / "bare.json").read_text()) if (store / "bare.json").exists() else None
    else:
        record["runs"] = describe_runs(store, record["start"], record["end"])
    return record


def describe_runs(store: Path, since: float, until: float) -> list[dict]:
    """The project's runs started between `since` and `until`: start and end (s after `since`), phase timings,
    traces in the store, metrics. MIPROv2's own trial runs (with tracking.log_compiles) in one row."""
    from pipelines.tracking.traces import count_traces

    mlflow.set_tracking_uri(common.sqlite_uri(store))
    client = MlflowClient()
    window = f"attributes.start_time >= {int(since * 1000)} and attributes.start_time <= {int(until * 1000)}"
    runs = client.search_runs([client.get_experiment_by_name(common.EXPERIMENT).experiment_id], window,
                              max_results=1000, order_by=["attributes.start_time ASC"])
    out = [{"step": r.data.tags["step"], "run_id": r.info.run_id, "status": r.info.status,
            "from": r.info.start_time / 1000 - since, "to": r.info.end_time / 1000 - since if r.info.end_time else None,
            "phases": common.phase_times(r), "traces": count_traces(r.info.run_id), "metrics": r.data.metrics}
           for r in runs if "step" in r.data.tags]
    if trials := [r for r in runs if "step" not in r.data.tags]:
        out.append({"step": f"(MIPROv2 trial runs) x{len(trials)}", "traces": sum(count_traces(r.info.run_id)
                                                                                   for r in trials)})
    return out


def registered_demos(store: Path) -> list[str]:
    """Demos per predictor of each registered MIPROv2 program, loaded back as a user would."""
    from pipelines.tracking.models import load_program

    client, out = MlflowClient(common.sqlite_uri(store)), []  # (describe_runs set the tracking URI)
    for mv in client.search_model_versions():
        if client.get_run(mv.run_id).data.tags.get("step") == "optimize":
            predictors = load_program(f"models:/{mv.name}/{mv.version}").named_predictors()
            out.append(f"{mv.name}/{mv.version}: demos, bootstrapped: " + ", ".join(
                f"{n} {len(p.demos)}, {sum(1 for d in p.demos if d.get('augmented'))}" for n, p in predictors))
    return out


# Report ------------------------------------------------------------------------------------------------------


def report(results: dict) -> str:
    phases = {p["phase"]: p for p in results["phases"]}
    lines = [f"Machine: {results['machine']}", f"Scratch: {results['store']}", ""]
    lines.append(common.table(
        ["phase", "exit", "wall s", "peak RSS MiB", "chat calls", "embedding calls", "store MiB after"],
        [[p["phase"], p["rc"], f"{p['wall_s']:.1f}", f"{p['peak_rss_mib']:.0f}", p["chat_calls"],
          p["embedding_calls"], f"{p['store_mib']:.1f}"] for p in results["phases"]]))
    rows = [[p["phase"], r["step"], r.get("status", ""), *(f"{r[k]:.1f}" if r.get(k) is not None else "—"
                                                          for k in ("from", "to")),
             *phase_cells(r.get("phases", {})),
             int(sum(r.get("metrics", {}).get(k, 0) for k in ("num_examples", "baseline_num_examples"))), r["traces"]]
            for p in results["phases"] for r in p.get("runs", [])]
    lines += ["", "Each run: its start and end in its phase, and its own phase timings (s):",
              common.table(["phase", "run", "status", "from s", "to s", *PHASE_COLUMNS, "examples evaluated",
                            "traces logged"], rows)]
    if readme := phases.get("readme"):
        lines += ["", f"readme: the embedded server's start alone took {readme['server_alone_s']:.1f} s; total "
                      f"{readme['wall_s'] / 60:.1f} min, target <= 15 min: "
                      f"{'met' if readme['wall_s'] <= 900 and readme['rc'] == 0 else 'MISSED'}"]
        if readme["other_servers"]:
            lines.append(f"NOTE: other embedded servers were running and competed for CPU: {readme['other_servers']}")
    traced, untraced = (next(iter(phases.get(k, {}).get("runs", [])), {}).get("phases", {})
                        for k in ("rag-cached", "rag-untraced"))
    if traced.get("evaluate") and untraced.get("evaluate"):
        lines += ["", f"Cached re-evaluation of dev, traced / untraced (target <= 1.5x, every example traced): "
                      f"{traced['evaluate']:.1f} / {untraced['evaluate']:.1f} s = "
                      f"{traced['evaluate'] / untraced['evaluate']:.2f}x (rest of the run: {traced['other']:.1f} / "
                      f"{untraced['other']:.1f} s)"]
    if (phases.get("bare") or {}).get("bare"):
        lines += ["", "bare script: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in phases["bare"]["bare"].items())]
    return "\n".join(lines + ["", "Registered MIPROv2 programs, loaded back:",
                              *([f"- {d}" for d in results["demos"]] or ["- none"])])


def main(args) -> None:
    store = Path(args.scratch) if args.scratch else common.scratch("jobs")
    if set(args.phases) - {"readme"}:
        generate(store / "cache" / "data", args.docs, args.examples, args.seed)
    results = user_jobs.run_phases(store, args.phases, run_phase, args, latency=args.latency, score=0.7,
                                   demo_score=1.0)
    results.update(demos=registered_demos(store), machine=common.machine())
    (store / "results.json").write_text(json.dumps(results, indent=2))
    print(report(results))


if __name__ == "__main__":
    cli = common.parser(__doc__)
    cli.add_argument("--phases", nargs="+", choices=["readme", *PHASES], default=list(PHASES), help="in this order")
    cli.add_argument("--docs", type=int, default=28_436, help="corpus documents")
    cli.add_argument("--examples", type=int, default=1_200, help="QA examples (the splits take 1,000)")
    cli.add_argument("--seed", type=int, default=0, help="data generator seed")
    cli.add_argument("--latency", type=float, default=0.0, help="fake server seconds per chat request")
    cli.add_argument("--threads", type=int, default=24, help="num_threads (evaluation and MIPROv2)")
    cli.add_argument("--auto", default="medium", choices=["light", "medium", "heavy"], help="MIPROv2 auto")
    cli.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for the project's jobs")
    cli.add_argument("--scratch", help="reuse this dir (store, caches, data) instead of a fresh one")
    # Workers: the bare tutorial, or the embedded server's start alone (the server dies with the worker).
    common.run_script(cli, main, lambda args: bare_tutorial(args) if getattr(args, "bare", None) else
                      {"seconds": common.timed(common.private_server, args.state_dir)[1]})
