"""The index cache: an index is built once per corpus, text length and embedder, and read back from
`<cache dir>/<content hash>/` (`cache_key`) without embedding the corpus again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pipelines.data import Corpus, sha256_file
from pipelines.errors import ConfigError
from pipelines.retrieval.embedders import embedder_identity
from pipelines.retrieval.index import INDEX_FORMAT, Index, normalize, read_index, write_index

log = logging.getLogger(__name__)


def cache_key(corpus_path: Path, max_characters: int | None, emb_identity: dict[str, Any]) -> str:
    """Content hash of everything the embeddings depend on."""
    payload = json.dumps({"corpus_sha256": sha256_file(corpus_path), "max_characters": max_characters,
                          "embedder": emb_identity, "format": INDEX_FORMAT}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


@dataclass(frozen=True, kw_only=True)
class IndexBuild:
    index: Index
    path: Path
    cache_hit: bool
    embedded: int  # texts sent to the embedder in this process


def load_or_build_index(corpus: Corpus, embedder, emb_cfg, max_characters: int | None, cache_dir: Path,
                        brute_force_threshold: int = 20_000,
                        embed: Callable[[list[str]], np.ndarray] | None = None) -> IndexBuild:
    """The index for `corpus`, from `cache_dir/<content hash>/` when present and sound, else built there.
    `embed` computes the passages' embeddings (default: `embedder` here, in batches; elsewhere, e.g.
    on Spark: `pipelines.scale.engine.embed_on_spark`); the cache key does not depend on where."""
    if not corpus.texts:
        raise ConfigError(f"{corpus.path}: the corpus is empty")
    identity = embedder_identity(emb_cfg)
    key = cache_key(corpus.path, max_characters, identity)
    path = Path(cache_dir) / key
    if path.exists():
        try:
            index = read_index(path, identity, brute_force_threshold)
            log.info("Index cache hit: %s (%d passages); no embeddings computed", path, len(index.passages))
            return IndexBuild(index=index, path=path, cache_hit=True, embedded=0)
        except Exception as e:  # a half-written or foreign cache is rebuilt, never trusted
            log.warning("Index cache at %s is unusable (%s); rebuilding it", path, e)
            shutil.rmtree(path, ignore_errors=True)
    passages = [t[:max_characters] if max_characters else t for t in corpus.texts]
    vectors = embed(passages) if embed else embed_all(embedder, passages, batch_size=emb_cfg.batch_size)
    index = Index(normalize(vectors), passages, list(corpus.doc_ids),
                  meta={"key": key, "embedder": identity, "max_characters": max_characters,
                        "corpus": str(corpus.path), "format": INDEX_FORMAT},
                  brute_force_threshold=brute_force_threshold)
    write_index(index, path)
    log.info("Index built: %d passages embedded, cached at %s", len(passages), path)
    return IndexBuild(index=index, path=path, cache_hit=False, embedded=len(passages))


def embed_all(embedder, texts: list[str], batch_size: int) -> np.ndarray:
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc="embed corpus", unit="batch"):
        chunks.append(np.asarray(embedder(texts[start:start + batch_size]), dtype=np.float32))
    vectors = np.concatenate(chunks)
    if vectors.ndim != 2 or len(vectors) != len(texts):
        raise RuntimeError(f"embedder returned shape {vectors.shape} for {len(texts)} texts")
    return vectors
