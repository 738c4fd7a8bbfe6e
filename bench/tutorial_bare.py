"""DSPy's RAG tutorial (https://dspy.ai/tutorials/rag/) as a bare script: no MLflow, no project code, pointed at
any OpenAI-compatible server, each step timed; DSPy's cache in --cache-dir, so a run starts cold. bench/jobs.py
runs it (phase `bare`) beside the project's `optimize`, against the same fake server.

    python bench/tutorial_bare.py --data-dir DIR --api-base http://127.0.0.1:PORT/v1 --cache-dir DIR
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import dspy
import ujson
from dspy.evaluate import SemanticF1


def main(args) -> None:
    dspy.configure_cache(disk_cache_dir=str(args.cache_dir))
    # The key comes from OPENAI_API_KEY, as in the tutorial; only the server differs.
    lm = dspy.LM("openai/gpt-4o-mini", api_base=args.api_base)
    dspy.configure(lm=lm)
    times, t = {}, time.perf_counter()

    with open(args.data_dir / "ragqa_arena_tech_examples.jsonl") as f:
        data = [ujson.loads(line) for line in f]
    data = [dspy.Example(**d).with_inputs("question") for d in data]
    random.Random(0).shuffle(data)
    trainset, devset = data[:200], data[200:500]

    metric = SemanticF1(decompositional=True)
    evaluate = dspy.Evaluate(devset=devset, metric=metric, num_threads=args.threads, display_progress=True)

    max_characters = 6000
    with open(args.data_dir / "ragqa_arena_tech_corpus.jsonl") as f:
        corpus = [ujson.loads(line)["text"][:max_characters] for line in f]
    embedder = dspy.Embedder("openai/text-embedding-3-small", dimensions=512, api_base=args.api_base)
    search = dspy.retrievers.Embeddings(embedder=embedder, corpus=corpus, k=5)
    times["load_and_index_s"] = time.perf_counter() - t

    class RAG(dspy.Module):
        def __init__(self):
            self.respond = dspy.ChainOfThought("context, question -> response")

        def forward(self, question):
            context = search(question).passages
            return self.respond(context=context, question=question)

    t = time.perf_counter()
    baseline = evaluate(RAG())
    times["baseline_eval_s"] = time.perf_counter() - t

    t = time.perf_counter()
    tp = dspy.MIPROv2(metric=metric, auto=args.auto, num_threads=args.threads)
    optimized_rag = tp.compile(RAG(), trainset=trainset, max_bootstrapped_demos=2, max_labeled_demos=2)
    times["compile_s"] = time.perf_counter() - t

    t = time.perf_counter()
    optimized = evaluate(optimized_rag)
    times["optimized_eval_s"] = time.perf_counter() - t

    result = {**times, "corpus": len(corpus), "examples": len(data), "baseline_score": baseline.score,
              "optimized_score": optimized.score,
              "demos": {name: len(p.demos) for name, p in optimized_rag.named_predictors()}}
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="holds ragqa_arena_tech_{examples,corpus}.jsonl")
    parser.add_argument("--api-base", required=True, help="OpenAI-compatible server for chat and embeddings")
    parser.add_argument("--cache-dir", type=Path, required=True, help="DSPy's disk cache for this run")
    parser.add_argument("--threads", type=int, default=24)
    parser.add_argument("--auto", default="medium", choices=["light", "medium", "heavy"])
    parser.add_argument("--out", required=True, help="write the timings and scores as JSON here")
    main(parser.parse_args())
