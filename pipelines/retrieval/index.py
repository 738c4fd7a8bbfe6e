"""The index: normalized passage embeddings with their passages and doc ids, searched exactly, with a
FAISS IVF-PQ index for candidates above the brute-force threshold (as `dspy.retrievers.Embeddings`
does), and its on-disk layout (`write_index`, `read_index`), which the index cache (cache.py) and a
logged program's files (pipelines/packaging.py) share.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

INDEX_FORMAT = 1  # bump when the on-disk layout changes; old caches then miss


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
