"""Whole jobs through `mlflow run`, timed by phase, each run by its own `time_<phase>_s` (BENCHMARKS.md, 4 and 5).

readme: the README's main command (`mlflow run . --env-manager local --experiment-name ragqa-arena-tech`) on the
  embedded stack with cold caches and its own llama.cpp server (a fresh RAGQA_SERVER_DIR, so its start is
  measured; timed alone first, in a worker process it dies with). Target: <= 15 min.
The tutorial preset at full size against a fake server: a seeded synthetic corpus (28,436 documents) and 1,200
  examples where `data=ragqa_arena_tech` finds them, chat and embeddings from tests/fake_lm.py (judge score 0.7,
  1.0 for answers given with demos), each `experiment=tutorial` on one store and cache: rag (cold), optimize,
  main, rag-cached (all from DSPy's cache), rag-untraced (tracking.log_traces=false), and bare: DSPy's RAG tutorial
  (https://dspy.ai/tutorials/rag/) as a plain script (`bare_tutorial`: no MLflow, no project code), cold cache.
Per phase: wall time, peak RSS, requests to the fake, store size; per run: its start and end within the phase,
phase timings, examples evaluated, traces stored; the registered MIPROv2 programs' demos. Writes results.json.

    .venv/bin/python bench/jobs.py --phases readme     # ~10-15 min
    .venv/bin/python bench/jobs.py                     # the tutorial phases, 15-30 min on 2 cores
    .venv/bin/python bench/jobs.py --docs 2000 --auto light --phases rag optimize   # a quick look
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

import _common as common
from helpers import MLFLOW, user_env

PHASES = ("rag", "optimize", "main", "rag-cached", "rag-untraced", "bare")  # the tutorial's, in this order
ENTRY = {"readme": "main", "rag": "rag", "optimize": "optimize", "main": "main", "rag-cached": "rag",
         "rag-untraced": "rag"}
FAKE_ENV = {"OPENAI_API_KEY": "sk-fake-bench",  # never sent anywhere but the loopback fake
            # LiteLLM otherwise retries fetching its price list from the internet at every start (seconds offline).
            "LITELLM_LOCAL_MODEL_COST_MAP": "True"}

# Synthetic data in the tutorial's format ---------------------------------------------------------------------

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
FUNCTION_WORDS = "the a of to in and is that for it with as on be this you can or by not are if from".split()
VERBS = "configure install remove update restart debug fix enable disable mount share sync migrate deploy".split()
ONSETS, VOWELS, CODAS = "b c d f g k l m n p r s t v z br tr st pl gr".split(), "a e i o u ai eo".split(), \
    ["", "", "n", "x", "r", "s", "th", "ck"]


class TextMaker:
    """A vocabulary (function words, then technical terms, then made-up words: rank order) drawn with Zipf
    weights, cut into capitalized sentences of 6-20 words."""

    def __init__(self, rng: random.Random, size: int = 6000):
        terms, made_up = TERMS.split(), set()
        rng.shuffle(terms)
        while len(made_up) < size - len(FUNCTION_WORDS) - len(terms):
            made_up.add("".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.randint(2, 3)))
                        + rng.choice(CODAS))
        self.rng, self.words = rng, FUNCTION_WORDS + terms + sorted(made_up)
        self.cum_weights = list(itertools.accumulate(1.0 / rank for rank in range(1, len(self.words) + 1)))

    def text(self, n_words: int, seed_words: tuple[str, ...] = ()) -> str:
        words = self.rng.choices(self.words, cum_weights=self.cum_weights, k=n_words)
        for w in seed_words:  # topic words, so a question's gold documents share words with it
            words[self.rng.randrange(n_words)] = w
        sentences, i = [], 0
        while i < n_words:
            sentence = " ".join(words[i:i + (n := self.rng.randint(6, 20))])
            sentences.append(sentence[:1].upper() + sentence[1:] + ".")
            i += n
        return " ".join(sentences)


def generate(data_dir: Path, n_docs: int, n_examples: int, seed: int) -> None:
    """Write ragqa_arena_tech_{corpus,examples}.jsonl (deterministic for a seed), unless they are there."""
    paths = {kind: data_dir / f"ragqa_arena_tech_{kind}.jsonl" for kind in ("corpus", "examples")}
    if all(p.exists() for p in paths.values()):
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    maker = TextMaker(rng)
    doc_ids, topics = rng.sample(range(1, 10 * n_docs), n_docs), {}  # topics: a few words of the doc, for questions
    terms = maker.words[len(FUNCTION_WORDS):len(FUNCTION_WORDS) + 600]
    with open(paths["corpus"], "w") as f:
        for doc_id in doc_ids:
            # Log-normal length: median ~150 words (~1 kB), about 2% past the tutorial's 6000-char cut.
            n_words = min(1400, max(15, int(rng.lognormvariate(math.log(150), 0.8))))
            topic = topics[doc_id] = rng.sample(terms, 4)
            author = " ".join(w.capitalize() for w in rng.sample(maker.words[-3000:], 2))
            f.write(json.dumps({"doc_id": doc_id, "author": author, "text": maker.text(n_words, tuple(topic) * 3)})
                    + "\n")
    with open(paths["examples"], "w") as f:
        for _ in range(n_examples):
            gold = rng.sample(doc_ids, rng.randint(1, 3))
            topic = topics[gold[0]]
            question = f"how do i {rng.choice(VERBS)} the {topic[0]} {topic[1]} with {topic[2]}?"
            response = maker.text(rng.randint(100, 300), tuple(topic) * 2)
            f.write(json.dumps({"question": question, "response": response, "gold_doc_ids": gold}) + "\n")


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
    overrides = [*tutorial, f"hydra.run.dir={store}/hydra-{phase}", *untraced, *args.extra]
    return [MLFLOW, "run", ".", "-e", ENTRY[phase], "--env-manager", "local", "--experiment-name",
            common.EXPERIMENT, "-P", f"overrides={' '.join(overrides)}"]


def run_phase(phase: str, store: Path, api_base: str, counts, args) -> dict:
    from pipelines.server import running_servers

    cmd, record = phase_command(phase, store, api_base, args), {"phase": phase}
    if phase == "readme":  # the embedded server's start alone, then the job with its own
        record["server_alone_s"] = common.spawn_worker(args, state_dir=str(store / "server-alone"))["seconds"]
        record["other_servers"] = [f"{s['process']} at {s['api_base']}" for s in running_servers()]
    # As a user runs it, from the repo root, on the store and its caches, in no outer run.
    env = user_env({"MLFLOW_TRACKING_URI": common.sqlite_uri(store), "RAGQA_CACHE_DIR": str(store / "cache"),
                    "PYTHONDONTWRITEBYTECODE": "1", **({"RAGQA_SERVER_DIR": str(store / "server")}
                                                      if phase == "readme" else FAKE_ENV)})
    env = {k: v for k, v in env.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    chat0, emb0 = counts()
    start = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] {phase}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    with open(store / f"{phase}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=common.ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # peak RSS of the job and every descendant it waited for
    rc = proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    wall, rss = time.time() - start, usage.ru_maxrss / 1024
    chat1, emb1 = counts()
    files = [store / "mlflow.db", *(p for p in (store / "artifacts").rglob("*") if p.is_file())]
    record.update(cmd=" ".join(cmd), rc=rc, wall_s=wall, peak_rss_mib=rss, chat_calls=chat1 - chat0,
                  embedding_calls=emb1 - emb0, start=start, end=time.time(),
                  store_mib=sum(p.stat().st_size for p in files if p.exists()) / 2**20)
    if phase == "bare":
        record["bare"] = json.loads((store / "bare.json").read_text()) if (store / "bare.json").exists() else None
    else:
        record["runs"] = describe_runs(store, start, record["end"])
    print(f"[{time.strftime('%H:%M:%S')}] {phase}: exit {rc}, {wall:.0f} s, {rss:.0f} MiB, "
          f"{record['chat_calls']} chat / {record['embedding_calls']} embedding calls", file=sys.stderr, flush=True)
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
    from pipelines.tracking import load_program

    client, out = MlflowClient(common.sqlite_uri(store)), []  # (describe_runs set the tracking URI)
    for mv in client.search_model_versions():
        if client.get_run(mv.run_id).data.tags.get("step") == "optimize":
            predictors = load_program(f"models:/{mv.name}/{mv.version}").named_predictors()
            out.append(f"{mv.name}/{mv.version}: demos, bootstrapped: " + ", ".join(
                f"{n} {len(p.demos)}, {sum(1 for d in p.demos if d.get('augmented'))}" for n, p in predictors))
    return out


def bare_tutorial(args) -> dict:
    """The tutorial's own code against the fake server: its data, splits, SemanticF1, Embeddings retriever, RAG,
    MIPROv2; each step timed. The key comes from OPENAI_API_KEY, as in the tutorial; only the server differs."""
    import dspy
    from dspy.evaluate import SemanticF1

    data_dir, times, t = Path(args.bare) / "cache" / "data", {}, time.perf_counter()
    dspy.configure_cache(disk_cache_dir=str(Path(args.bare) / "bare-dspy-cache"))
    dspy.configure(lm=dspy.LM("openai/gpt-4o-mini", api_base=args.api_base))
    with open(data_dir / "ragqa_arena_tech_examples.jsonl") as f:
        data = [dspy.Example(**json.loads(line)).with_inputs("question") for line in f]
    random.Random(0).shuffle(data)
    trainset, devset = data[:200], data[200:500]
    metric = SemanticF1(decompositional=True)
    evaluate = dspy.Evaluate(devset=devset, metric=metric, num_threads=args.threads, display_progress=True)
    with open(data_dir / "ragqa_arena_tech_corpus.jsonl") as f:
        corpus = [json.loads(line)["text"][:6000] for line in f]
    embedder = dspy.Embedder("openai/text-embedding-3-small", dimensions=512, api_base=args.api_base)
    search = dspy.retrievers.Embeddings(embedder=embedder, corpus=corpus, k=5)
    times["load_and_index_s"] = time.perf_counter() - t

    class RAG(dspy.Module):
        def __init__(self):
            self.respond = dspy.ChainOfThought("context, question -> response")

        def forward(self, question):
            return self.respond(context=search(question).passages, question=question)

    baseline, times["baseline_eval_s"] = common.timed(evaluate, RAG())
    tp = dspy.MIPROv2(metric=metric, auto=args.auto, num_threads=args.threads)
    optimized_rag, times["compile_s"] = common.timed(tp.compile, RAG(), trainset=trainset, max_bootstrapped_demos=2,
                                                     max_labeled_demos=2)
    optimized, times["optimized_eval_s"] = common.timed(evaluate, optimized_rag)
    result = {**times, "corpus": len(corpus), "examples": len(data), "baseline_score": baseline.score,
              "optimized_score": optimized.score,
              "demos": {name: len(p.demos) for name, p in optimized_rag.named_predictors()}}
    (Path(args.bare) / "bare.json").write_text(json.dumps(result, indent=2))
    return result


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
    if not (store / "mlflow.db").exists():  # artifacts in the store: `mlflow run` would put them in the repo
        MlflowClient(common.sqlite_uri(store)).create_experiment(common.EXPERIMENT, (store / "artifacts").as_uri())
    results = {"store": str(store), "args": vars(args), "phases": [], "demos": []}
    with common.fake_lm(latency=args.latency, score=0.7, demo_score=1.0) as (api_base, counts):
        for phase in args.phases:
            results["phases"].append(run_phase(phase, store, api_base, counts, args))
            (store / "results.json").write_text(json.dumps(results, indent=2))
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
