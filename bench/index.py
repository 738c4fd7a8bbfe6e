"""Index benchmarks (BENCHMARKS.md, 3): (a) docs/s of `LocalEmbedder` over the sample corpus, model load apart,
median of 3; (b) `load_or_build_index` twice on an empty cache, its embedder counting calls: build vs cache hit
(target: 0 calls the second time); (c) `Index.search` latency, k=5, on --n x --dim synthetic normalized vectors,
FAISS IVF-PQ + re-rank vs brute force, queried with noisy copies of corpus vectors ("source in top-5": how often
the source comes back). Target: p50 <= 1 ms.

    .venv/bin/python bench/index.py [--queries 1000] [--n 28436] [--dim 512]
    .venv/bin/python bench/index.py --docs 28436 --spark   # (a) on the sample's texts repeated to 28,436
                                                           # documents, once, also on local Spark (BENCHMARKS.md, 7)
"""

from __future__ import annotations

import numpy as np

import _common as common


def embedding_throughput(cfg, corpus, docs: int | None, spark: bool) -> list:
    from pipelines.retrieval.embedders import LocalEmbedder

    texts = [t[:cfg.program.max_characters] for t in corpus.texts]
    texts = [f"{texts[i % len(texts)]} ({i})" for i in range(docs)] if docs else texts
    embedder = LocalEmbedder(package=cfg.embedder.package, batch_size=int(cfg.embedder.batch_size))
    _, load = common.timed(embedder, ["load the model"])
    passes = [common.timed(embedder, texts) for _ in range(1 if docs else 3)]
    vectors, sec = passes[-1][0], common.median([seconds for _, seconds in passes])
    chars = sum(map(len, texts)) / len(texts)
    rows = [["this process", len(texts), f"{chars:.0f}", vectors.shape[1], f"{load:.2f}", f"{sec:.2f}",
             f"{len(texts) / sec:.1f}"]]
    if spark:  # index.engine=spark's path: partitions of the corpus embedded in Spark tasks (model load inside)
        from pipelines.packaging import embedder_spec
        from pipelines.retrieval.embedders import build_embedder
        from pipelines.scale.engine import embed_on_spark
        from pipelines.scale.spark import session

        spread, sec = common.timed(embed_on_spark, session(cfg), texts, embedder_spec(build_embedder(cfg.embedder)))
        assert np.allclose(spread, vectors, atol=1e-4)
        rows.append([f"local Spark, {session(cfg).sparkContext.defaultParallelism} tasks", len(texts), f"{chars:.0f}",
                     spread.shape[1], "in tasks", f"{sec:.2f}", f"{len(texts) / sec:.1f}"])
    return rows


def cache(cfg, corpus) -> list:
    from pipelines.retrieval.cache import load_or_build_index
    from pipelines.retrieval.embedders import build_embedder

    from helpers import CountingEmbedder

    cache_dir, rows = common.scratch("index") / "index", []
    for attempt in ("first (empty cache)", "second (same corpus)"):
        embedder = CountingEmbedder(build_embedder(cfg.embedder))  # fresh: the model loads inside the build
        built, sec = common.timed(load_or_build_index, corpus, embedder, cfg.embedder, cfg.program.max_characters,
                                  cache_dir, brute_force_threshold=int(cfg.program.brute_force_threshold))
        rows.append([attempt, f"{sec:.3f}", "hit" if built.cache_hit else "built", embedder.calls, embedder.embedded,
                     ("met" if embedder.calls == 0 else "MISSED") if attempt.startswith("second") else ""])
    return rows


def latency(n: int, dim: int, queries: int) -> list:
    from pipelines.retrieval.index import Index, normalize

    rng = np.random.default_rng(0)
    vectors = normalize(rng.standard_normal((n, dim)).astype(np.float32))
    picks = rng.integers(0, n, queries)
    qs = normalize(vectors[picks] + 0.5 * rng.standard_normal((queries, dim)).astype(np.float32) / np.sqrt(dim))
    rows = []
    for name, threshold in (("faiss IVF-PQ + re-rank", n - 1), ("brute force", n + 1)):
        index, build = common.timed(Index, vectors, [""] * n, list(range(n)), meta={}, brute_force_threshold=threshold)
        for q in qs[:20]:  # warm-up
            index.search(q[None, :], 5)
        found, times = zip(*(common.timed(index.search, q[None, :], 5) for q in qs), strict=True)
        ms = np.array(times) * 1000
        p50, p99 = np.percentile(ms, 50), np.percentile(ms, 99)
        source_hit = np.mean([p in hits[0][0] for p, hits in zip(picks, found, strict=True)])
        rows.append([name, f"{build:.2f}", f"{p50:.3f}", f"{p99:.3f}", f"{ms.mean():.3f}", f"{source_hit:.3f}",
                     "met" if p50 <= 1.0 else "MISSED"])
    return rows


def main(args) -> None:
    from pipelines.config import compose
    from pipelines.data import load_corpus

    cfg = compose("rag", [f"paths.cache={common.scratch('index-spark')}"])
    corpus = load_corpus(cfg.data)
    print(f"Machine: {common.machine()}\nCorpus: {corpus.path.relative_to(common.ROOT)}\n")
    print("(a) Embedding throughput, LocalEmbedder, batch_size", cfg.embedder.batch_size)
    print(common.table(["where", "docs", "mean chars", "dim", "model load s", "embed s (median of 3; --docs: 1)",
                        "docs/s"], embedding_throughput(cfg, corpus, args.docs, args.spark)))
    print("\n(b) load_or_build_index: build vs cache hit (fresh embedder each time)")
    print(common.table(["run", "seconds", "index", "embedder calls", "texts embedded", "target: 0 calls"],
                       cache(cfg, corpus)))
    print(f"\n(c) Index.search, {args.n:,} x {args.dim} synthetic normalized vectors, {args.queries} single-query "
          f"searches, k=5 (ms)")
    print(common.table(["method", "build s", "p50", "p99", "mean", "source in top-5", "target p50 <= 1 ms"],
                       latency(args.n, args.dim, args.queries)))


if __name__ == "__main__":
    cli = common.parser(__doc__, queries=1000, n=28_436, dim=512, docs=0, spark=False)
    main(cli.parse_args())
