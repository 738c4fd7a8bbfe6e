"""DSPy's RAG tutorial (https://dspy.ai/tutorials/rag/) as a plain script, no MLflow and no project code: the
`bare` phase of bench/jobs.py, run in a worker process against the fake LM server, each step timed."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import _common as common


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
