"""Index benchmarks: embedding throughput, index cache hit vs build, retrieval latency.

(a) docs/s of `pipelines.retrieval.LocalEmbedder` (all-MiniLM-L6-v2, CPU) over the shipped sample
    corpus (texts cut at program.max_characters as the project does), model load timed apart,
    median of 3 passes.
(b) `pipelines.retrieval.load_or_build_index` twice on an empty cache dir, through the project's
    embedder (`build_embedder`) wrapped to count calls (tests/helpers.py): build time vs cache-hit time.
    Target: the second run makes 0 embedder calls.
(c) `pipelines.retrieval.Index.search` latency, single-query, k=5, on 28,436 x 512 synthetic
    normalized vectors (the tutorial corpus size and embedding width): FAISS IVF-PQ + exact
    re-rank (brute_force_threshold below n) vs brute force (threshold above n); queries are
    noisy copies of corpus vectors (cosine ~0.9 to their source); "source in top-5" is how often
    the source vector comes back (the other neighbours of random vectors are near-ties, so
    recall against brute force means little here). Target: p50 <= 1 ms.

    .venv/bin/python bench/index.py [--queries 1000]
"""

from __future__ import annotations

import time

import numpy as np

from _common import ROOT, machine, median, parser, scratch, table


def embedding_throughput(cfg, corpus) -> list:
    from pipelines.retrieval import LocalEmbedder

    texts = [t[:cfg.program.max_characters] for t in corpus.texts]
    embedder = LocalEmbedder(package=cfg.embedder.package, batch_size=int(cfg.embedder.batch_size))
    t = time.perf_counter()
    embedder(["load the model"])
    load = time.perf_counter() - t
    passes = []
    for _ in range(3):
        t = time.perf_counter()
        vectors = embedder(texts)
        passes.append(time.perf_counter() - t)
    assert vectors.shape[0] == len(texts)
    sec = median(passes)
    chars = sum(map(len, texts)) / len(texts)
    return [len(texts), f"{chars:.0f}", vectors.shape[1], f"{load:.2f}", f"{sec:.2f}", f"{len(texts) / sec:.1f}"]


def cache(cfg, corpus) -> list:
    from pipelines.retrieval import build_embedder, load_or_build_index

    from helpers import CountingEmbedder

    cache_dir = scratch("index") / "index"
    rows = []
    for attempt in ("first (empty cache)", "second (same corpus)"):
        embedder = CountingEmbedder(build_embedder(cfg.embedder))  # fresh: the model loads inside the build
        t = time.perf_counter()
        built = load_or_build_index(corpus, embedder, cfg.embedder, cfg.program.max_characters, cache_dir,
                                    brute_force_threshold=int(cfg.program.brute_force_threshold))
        sec = time.perf_counter() - t
        rows.append([attempt, f"{sec:.3f}", "hit" if built.cache_hit else "built", embedder.calls, embedder.embedded,
                     ("met" if embedder.calls == 0 else "MISSED") if attempt.startswith("second") else ""])
    return rows


def latency(n: int, dim: int, queries: int) -> list:
    from pipelines.retrieval import Index, normalize

    rng = np.random.default_rng(0)
    vectors = normalize(rng.standard_normal((n, dim)).astype(np.float32))
    picks = rng.integers(0, n, queries)
    qs = normalize(vectors[picks] + 0.5 * rng.standard_normal((queries, dim)).astype(np.float32) / np.sqrt(dim))
    ids, rows, results = list(range(n)), [], {}
    for name, threshold in (("faiss IVF-PQ + re-rank", n - 1), ("brute force", n + 1)):
        t = time.perf_counter()
        index = Index(vectors, [""] * n, ids, meta={}, brute_force_threshold=threshold)
        build = time.perf_counter() - t
        for q in qs[:20]:  # warm-up
            index.search(q[None, :], 5)
        times, found = [], []
        for q in qs:
            t = time.perf_counter()
            hit = index.search(q[None, :], 5)[0][0]
            times.append(time.perf_counter() - t)
            found.append(hit)
        results[name] = found
        ms = np.array(times) * 1000
        p50, p99 = np.percentile(ms, 50), np.percentile(ms, 99)
        source_hit = np.mean([p in r for p, r in zip(picks, found, strict=True)])
        rows.append([name, f"{build:.2f}", f"{p50:.3f}", f"{p99:.3f}", f"{ms.mean():.3f}", f"{source_hit:.3f}",
                     "met" if p50 <= 1.0 else "MISSED"])
    return rows


def main(args) -> None:
    from pipelines.config import compose
    from pipelines.data import load_corpus

    cfg = compose("rag")
    corpus = load_corpus(cfg.data)
    print(f"Machine: {machine()}\nCorpus: {corpus.path.relative_to(ROOT)}\n")
    print("(a) Embedding throughput, LocalEmbedder, batch_size", cfg.embedder.batch_size)
    print(table(["docs", "mean chars", "dim", "model load s", "embed s (median of 3)", "docs/s"],
                [embedding_throughput(cfg, corpus)]))
    print("\n(b) load_or_build_index: build vs cache hit (fresh embedder each time)")
    print(table(["run", "seconds", "index", "embedder calls", "texts embedded", "target: 0 calls"],
                cache(cfg, corpus)))
    rows = latency(args.n, args.dim, args.queries)
    print(f"\n(c) Index.search, {args.n:,} x {args.dim} synthetic normalized vectors, {args.queries} single-query "
          f"searches, k=5 (ms)")
    print(table(["method", "build s", "p50", "p99", "mean", "source in top-5", "target p50 <= 1 ms"], rows))


if __name__ == "__main__":
    cli = parser(__doc__)
    cli.add_argument("--queries", type=int, default=1000)
    cli.add_argument("--n", type=int, default=28_436)
    cli.add_argument("--dim", type=int, default=512)
    main(cli.parse_args())
