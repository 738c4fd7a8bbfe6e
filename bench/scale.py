"""Scale check: the tutorial preset at full size through `mlflow run`, against a fake OpenAI-compatible server.

Writes a synthetic corpus (28,436 documents) and 1,200 examples in the tutorial's JSONL format, from a
seeded vocabulary, where `data=ragqa_arena_tech` expects them (RAGQA_CACHE_DIR/data, so nothing is
downloaded), starts tests/fake_lm.py in its own process for chat and embeddings (judge score 0.7, and
1.0 for answers given with demos, so bootstrapped demos pass the metric and help), and runs these
phases in order, each `experiment=tutorial` (gpt-4o-mini and text-embedding-3-small by name, 24
threads, MIPROv2 auto=medium) with both api_bases on the fake, one sqlite store and one cache:

  rag           `mlflow run -e rag`: corpus embeddings + index, dev evaluation; cold caches
  optimize      `mlflow run -e optimize`: baseline eval, MIPROv2 compile, optimized eval
  main          `mlflow run -e main`: cot, rag, optimize as child runs of one parent
  rag-cached    `rag` again: everything answered from DSPy's cache, traces on (the default)
  rag-untraced  the same with tracking.log_traces=false
  bare          bench/tutorial_bare.py, the tutorial's own script without MLflow, its own cold DSPy cache

Per phase: wall time, peak RSS (os.wait4 on `mlflow run`, which covers the job it waits for), chat and
embedding requests served by the fake, store size (mlflow.db + artifacts) afterwards. Per MLflow run:
its duration and its own phase timings (`time_<phase>_s`: index load or build before the run opens,
evaluations, MIPROv2 compile, log model, register; the rest of the run is config, datasets, results
and assessments, trace export), examples evaluated and traces in the store. Then the demos of every
registered MIPROv2 program, loaded back.
Prints Markdown tables and writes results.json to the scratch dir.

    .venv/bin/python bench/scale.py                          # 15-30 min on 2 cores
    .venv/bin/python bench/scale.py --docs 2000 --auto light --phases rag optimize   # a quick look
    .venv/bin/python bench/scale.py --analyze $TMPDIR/ragqa-bench/bench-scale-XXXX        # tables again
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

from _common import (
    EXPERIMENT,
    ROOT,
    VENV_BIN,
    ServerProcess,
    create_experiment,
    machine,
    mlflow_run_env,
    parser,
    phase_times,
    run_job,
    scratch,
    sqlite_uri,
    step_runs,
    table,
)

PHASES = ("rag", "optimize", "main", "rag-cached", "rag-untraced", "bare")
ENTRY = {"rag": "rag", "optimize": "optimize", "main": "main", "rag-cached": "rag", "rag-untraced": "rag"}
PHASE_OVERRIDES = {"rag-untraced": ["tracking.log_traces=false"]}
FAKE_ENV = {
    "OPENAI_API_KEY": "sk-fake-bench",  # never sent anywhere but the loopback fake
    # LiteLLM otherwise retries fetching its price list from the internet at every start (seconds offline).
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
}

# ---------------------------------------------------------------------------------------------
# Synthetic data in the tutorial's format

TERMS = """kernel socket thread mutex buffer cache proxy daemon shell script config cluster container volume image
registry branch commit merge rebase remote origin upstream patch diff stash index packet route gateway
subnet firewall port tunnel certificate cipher hash salt token session cookie header query schema table
column join cursor transaction lock replica shard partition backup snapshot journal compiler linker loader
library module package dependency version release build artifact pipeline runner stack heap pointer
closure iterator generator coroutine callback promise event loop signal process service timer cron log
archive mount filesystem inode driver firmware boot display keyboard printer network interface address
resolver domain mail relay queue broker topic consumer producer array vector matrix string integer object
class method field decorator permission user group sudo password terminal editor plugin extension browser
server client request response endpoint latency timeout retry quota memory swap disk cpu core scheduler"""
FUNCTION_WORDS = "the a of to in and is that for it with as on be this you can or by not are if from"
VERBS = "configure install remove update restart debug fix enable disable mount share sync migrate deploy"
ONSETS, VOWELS, CODAS = "b c d f g k l m n p r s t v z br tr st pl gr", "a e i o u ai eo", ", , n, x, r, s, th, ck"


def vocabulary(rng: random.Random, size: int = 6000) -> list[str]:
    """Function words first, then technical terms, then made-up words: rank order for Zipf weights."""
    onsets, vowels, codas = ONSETS.split(), VOWELS.split(), CODAS.split(", ")
    function_words, terms = FUNCTION_WORDS.split(), TERMS.split()
    rng.shuffle(terms)
    made_up: set[str] = set()
    while len(made_up) < size - len(function_words) - len(terms):
        made_up.add("".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.randint(2, 3)))
                    + rng.choice(codas))
    return function_words + terms + sorted(made_up)


class TextMaker:
    """Words drawn with Zipf weights, cut into capitalized sentences of 6-20 words."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.words = vocabulary(rng)
        self.cum_weights, total = [], 0.0
        for rank in range(1, len(self.words) + 1):
            total += 1.0 / rank
            self.cum_weights.append(total)

    def text(self, n_words: int, seed_words: tuple[str, ...] = ()) -> str:
        words = self.rng.choices(self.words, cum_weights=self.cum_weights, k=n_words)
        for w in seed_words:  # topic words, so a question's gold documents share words with it
            words[self.rng.randrange(n_words)] = w
        sentences, i = [], 0
        while i < n_words:
            n = self.rng.randint(6, 20)
            sentence = " ".join(words[i:i + n])
            sentences.append(sentence[:1].upper() + sentence[1:] + ".")
            i += n
        return " ".join(sentences)

    def name(self) -> str:
        return " ".join(w.capitalize() for w in self.rng.sample(self.words[-3000:], 2))


def generate(data_dir: Path, n_docs: int, n_examples: int, seed: int) -> dict[str, Path]:
    """Write ragqa_arena_tech_{corpus,examples}.jsonl (deterministic for a seed); skip files already there."""
    paths = {kind: data_dir / f"ragqa_arena_tech_{kind}.jsonl" for kind in ("corpus", "examples")}
    if all(p.exists() for p in paths.values()):
        return paths
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    maker = TextMaker(rng)
    doc_ids = rng.sample(range(1, 10 * n_docs), n_docs)
    first_term = len(FUNCTION_WORDS.split())
    topics = {}  # doc_id -> a few of its words, reused by the questions it answers
    with open(paths["corpus"], "w") as f:
        for doc_id in doc_ids:
            # Log-normal length: median ~150 words (~1 kB), about 2% past the tutorial's 6000-char cut.
            n_words = min(1400, max(15, int(rng.lognormvariate(math.log(150), 0.8))))
            topic = rng.sample(maker.words[first_term:first_term + 600], 4)
            topics[doc_id] = topic
            f.write(json.dumps({"doc_id": doc_id, "author": maker.name(),
                                "text": maker.text(n_words, tuple(topic) * 3)}) + "\n")
    verbs = VERBS.split()
    with open(paths["examples"], "w") as f:
        for _ in range(n_examples):
            gold = rng.sample(doc_ids, rng.randint(1, 3))
            topic = topics[gold[0]]
            question = f"how do i {rng.choice(verbs)} the {topic[0]} {topic[1]} with {topic[2]}?"
            response = maker.text(rng.randint(100, 300), tuple(topic) * 2)
            f.write(json.dumps({"question": question, "response": response, "gold_doc_ids": gold}) + "\n")
    return paths


# ---------------------------------------------------------------------------------------------
# Running and measuring the phases


def phase_command(phase: str, store: Path, api_base: str, args) -> list[str]:
    if phase == "bare":
        return [sys.executable, str(ROOT / "bench" / "tutorial_bare.py"), "--data-dir", str(store / "cache" / "data"),
                "--api-base", api_base, "--cache-dir", str(store / "bare-dspy-cache"), "--threads", str(args.threads),
                "--auto", args.auto, "--out", str(store / "bare.json")]
    overrides = ["experiment=tutorial", f"lm.api_base={api_base}", f"embedder.api_base={api_base}",
                 f"num_threads={args.threads}", f"optimizer.auto={args.auto}", f"hydra.run.dir={store}/hydra-{phase}",
                 *PHASE_OVERRIDES.get(phase, []), *args.extra]
    return [str(VENV_BIN / "mlflow"), "run", str(ROOT), "-e", ENTRY[phase], "--env-manager", "local",
            "--experiment-name", EXPERIMENT, "-P", f"overrides={' '.join(overrides)}"]


def store_mib(store: Path) -> float:
    files = [store / "mlflow.db", *(p for p in (store / "artifacts").rglob("*") if p.is_file())]
    return sum(p.stat().st_size for p in files if p.exists()) / 2**20


def run_phase(phase: str, store: Path, fake: ServerProcess, args) -> dict:
    cmd = phase_command(phase, store, fake.api_base, args)
    chat0, emb0 = fake.counts()
    start = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] {phase}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    rc, wall, rss = run_job(cmd, mlflow_run_env(store, **FAKE_ENV), store / f"{phase}.log")
    chat1, emb1 = fake.counts()
    record = {"phase": phase, "cmd": " ".join(cmd), "rc": rc, "wall_s": wall, "peak_rss_mib": rss,
              "chat_calls": chat1 - chat0, "embedding_calls": emb1 - emb0, "start": start, "end": time.time(),
              "store_mib": store_mib(store), "log": str(store / f"{phase}.log")}
    if phase == "bare":
        bare = store / "bare.json"
        record["bare"] = json.loads(bare.read_text()) if bare.exists() else None
    else:
        record["runs"] = describe_runs(store, start, record["end"])
    print(f"[{time.strftime('%H:%M:%S')}] {phase}: exit {rc}, {wall:.0f} s, {rss:.0f} MiB, "
          f"{record['chat_calls']} chat / {record['embedding_calls']} embedding calls", file=sys.stderr, flush=True)
    return record


def describe_runs(store: Path, since: float, until: float) -> list[dict]:
    """The project's runs started between `since` and `until`, with their own phase timings. MIPROv2's own
    trial runs (autolog's eval_* children, with tracking.log_compiles) are summed in one row."""
    import mlflow

    from pipelines.tracking.traces import count_traces

    mlflow.set_tracking_uri(sqlite_uri(store))
    runs = step_runs(store, since, until)
    trials = [r for r in runs if "step" not in r.data.tags]
    out = []
    for run in (r for r in runs if "step" in r.data.tags):
        metrics, rid = run.data.metrics, run.info.run_id
        out.append({"step": run.data.tags["step"], "run_id": rid, "status": run.info.status, **phase_times(run),
                    "traces": count_traces(rid),
                    "examples": int(metrics.get("num_examples", 0) + metrics.get("baseline_num_examples", 0)) or None,
                    "semantic_f1": metrics.get("semantic_f1"),
                    "registered_version": run.data.tags.get("registered_version"),
                    "trace_metrics": {k: v for k, v in metrics.items() if "trace" in k},
                    "traces_missing": {k: v for k, v in run.data.tags.items() if k.endswith("traces_missing")}})
    if trials:
        out.append({"step": "(MIPROv2 trial runs)", "runs": len(trials),
                    "traces": sum(count_traces(r.info.run_id) for r in trials)})
    return out


def registered_demos(store: Path) -> list[dict]:
    """Demos per predictor of each registered MIPROv2 program, loaded back as a user would."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import load_program

    mlflow.set_tracking_uri(sqlite_uri(store))
    client, out = MlflowClient(), []
    for mv in client.search_model_versions():
        if client.get_run(mv.run_id).data.tags.get("step") != "optimize":
            continue
        program = load_program(f"models:/{mv.name}/{mv.version}")
        out.append({"model": f"{mv.name}/{mv.version}", "run_id": mv.run_id,
                    "demos": {n: len(p.demos) for n, p in program.named_predictors()},
                    "bootstrapped": {n: sum(1 for d in p.demos if d.get("augmented"))
                                     for n, p in program.named_predictors()}})
    return out


# ---------------------------------------------------------------------------------------------
# Report


def seconds(value) -> str:
    return "—" if value is None else f"{value:.1f}"


def evaluation(run: dict) -> float | None:
    """The run's (first) evaluation: optimize's baseline, else its only one."""
    return run.get("baseline_evaluate", run.get("evaluate"))


def report(results: dict) -> str:
    phases = {p["phase"]: p for p in results["phases"]}
    lines = [f"Machine: {results['machine']}", f"Scratch: {results['store']}", ""]
    lines.append(table(["phase", "exit", "wall s", "peak RSS MiB", "chat calls", "embedding calls", "store MiB after"],
                       [[p["phase"], p["rc"], seconds(p["wall_s"]), f"{p['peak_rss_mib']:.0f}", p["chat_calls"],
                         p["embedding_calls"], f"{p['store_mib']:.1f}"] for p in results["phases"]]))
    rows = []
    for p in results["phases"]:
        for r in p.get("runs", []):
            if "run_id" not in r:
                rows.append([p["phase"], f"{r['step']} x{r['runs']}", *[""] * 10, r["traces"]])
                continue
            optimized = r.get("evaluate") if "baseline_evaluate" in r else None
            rows.append([p["phase"], r["step"], r["status"], *map(seconds, (
                r.get("run"), r.get("index"), evaluation(r), r.get("compile"), optimized, r.get("log_model"),
                r.get("register"), r.get("other"))), r["examples"] or "—", r["traces"]])
    lines += ["", "Inside each run, its own phase timings (time_<phase>_s; the index is loaded before the run opens):",
              table(["phase", "run", "status", "run s", "index s", "eval s (optimize: baseline)", "MIPROv2 compile s",
                     "optimized eval s", "log model s", "register s", "rest of run s", "examples evaluated",
                     "traces logged"], rows)]
    missing = [f"- {p['phase']} / {r['step']}: " + v[:200].replace("\n", " ")
               for p in results["phases"] for r in p.get("runs", []) for v in r.get("traces_missing", {}).values()]
    if missing:
        lines += ["", "Traces the project reported missing (tag `*traces_missing`):", *missing]
    traced, untraced = (_first_run(phases.get(k)) for k in ("rag-cached", "rag-untraced"))
    if traced and untraced and evaluation(traced) and evaluation(untraced):
        moved = [f"{k}: {phases[k]['chat_calls']} chat / {phases[k]['embedding_calls']} embedding"
                 for k in ("rag-cached", "rag-untraced")]
        lines += ["", ("Cached re-evaluation of dev, 300 examples (target traced <= 1.5x untraced, every example "
                       "traced):"), table(["traces", "eval s", "rest of run s", "traces logged", "examples"],
                                    [[on, seconds(evaluation(r)), seconds(r.get("other")), r["traces"], r["examples"]]
                                     for on, r in (("on", traced), ("off", untraced))]),
                  f"ratio {evaluation(traced) / evaluation(untraced):.2f}x; requests to the fake: {'; '.join(moved)}"]
    if "optimize" in phases and "bare" in phases:
        opt, bare = phases["optimize"], phases["bare"]
        lines += ["", "LM calls of `optimize` against the bare tutorial script (same fake server):",
                  table(["", "chat calls", "embedding calls", "wall s"],
                        [["project `optimize`", opt["chat_calls"], opt["embedding_calls"], seconds(opt["wall_s"])],
                         ["bare tutorial script", bare["chat_calls"], bare["embedding_calls"],
                          seconds(bare["wall_s"])]])]
        if bare.get("bare"):
            lines.append("bare script: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in bare["bare"].items()))
    lines += ["", "Registered MIPROv2 programs, loaded back:"]
    lines += [f"- {d['model']}: demos {d['demos']}, bootstrapped {d['bootstrapped']}" for d in results["demos"]] \
        or ["- none"]
    return "\n".join(lines)


def _first_run(phase: dict | None) -> dict | None:
    runs = [r for r in (phase or {}).get("runs", []) if "run_id" in r]
    return runs[0] if runs else None


def main(args) -> None:
    if args.analyze:  # the runs are read from the store again
        results = json.loads((Path(args.analyze) / "results.json").read_text())
        for phase in results["phases"]:
            if "runs" in phase:
                phase["runs"] = describe_runs(Path(results["store"]), phase["start"], phase["end"])
        print(report(results))
        return
    store = Path(args.scratch) if args.scratch else scratch("scale")
    t = time.perf_counter()
    generate(store / "cache" / "data", args.docs, args.examples, args.seed)
    print(f"data in {store / 'cache' / 'data'} ({time.perf_counter() - t:.1f} s)", file=sys.stderr)
    if not (store / "mlflow.db").exists():
        create_experiment(store)
    results = {"store": str(store), "args": vars(args), "phases": [], "demos": []}
    with ServerProcess("fake", latency=args.latency, score=0.7, demo_score=1.0) as fake:
        for phase in (p for p in args.phases if not (args.skip_bare and p == "bare")):
            results["phases"].append(run_phase(phase, store, fake, args))
            (store / "results.json").write_text(json.dumps(results, indent=2))
    results["demos"] = registered_demos(store)
    results["machine"] = machine()
    (store / "results.json").write_text(json.dumps(results, indent=2))
    print(report(results))


if __name__ == "__main__":
    cli = parser(__doc__)
    cli.add_argument("--docs", type=int, default=28_436, help="corpus documents")
    cli.add_argument("--examples", type=int, default=1_200, help="QA examples (the splits take 1,000)")
    cli.add_argument("--seed", type=int, default=0, help="data generator seed")
    cli.add_argument("--latency", type=float, default=0.0, help="fake server seconds per chat request")
    cli.add_argument("--threads", type=int, default=24, help="num_threads (evaluation and MIPROv2)")
    cli.add_argument("--auto", default="medium", choices=["light", "medium", "heavy"], help="MIPROv2 auto")
    cli.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), help="in this order")
    cli.add_argument("--skip-bare", action="store_true", help="leave out the bare tutorial script")
    cli.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for the project's phases")
    cli.add_argument("--scratch", help="reuse this dir (store, caches, data) instead of a fresh one")
    cli.add_argument("--analyze", help="only print the tables of an earlier run in this dir")
    main(cli.parse_args())
