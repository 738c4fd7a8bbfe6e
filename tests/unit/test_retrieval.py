"""Index cache keys, cache hits without embedding, rebuilds, FAISS vs brute force, sharing, pickling."""

import ast
import copy
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from pipelines.config import compose
from pipelines.data import Corpus, load_corpus
from pipelines.errors import ConfigError
from pipelines.retrieval.cache import cache_key, load_or_build_index
from pipelines.retrieval.embedders import LocalEmbedder, embedder_identity
from pipelines.retrieval.index import Index
from pipelines.retrieval.retriever import Retriever
from pipelines.schema import EmbedderConfig

from helpers import CountingEmbedder


def emb_cfg(**kw):
    base = {"kind": "local", "model": "counting", "dimensions": 64, "batch_size": 8, "package": "x"}
    return OmegaConf.merge(OmegaConf.structured(EmbedderConfig), {**base, **kw})


def make_corpus(tmp_path, n=30, name="corpus.jsonl"):
    rows = [{"doc_id": 1000 + i, "author": "a", "text": f"topic{i} " * 5 + f"shared words about thing {i}"}
            for i in range(n)]
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Corpus([r["text"] for r in rows], [r["doc_id"] for r in rows], path)


def build(tmp_path, corpus, embedder, cfg=None, max_characters=6000, **kw):
    return load_or_build_index(corpus, embedder, cfg or emb_cfg(), max_characters, tmp_path / "index", **kw)


def test_same_inputs_hit_the_cache_with_zero_embedding_calls(tmp_path):
    corpus = make_corpus(tmp_path)
    first = build(tmp_path, corpus, CountingEmbedder())
    assert not first.cache_hit and first.embedded == 30
    embedder = CountingEmbedder()
    second = build(tmp_path, corpus, embedder)
    assert second.cache_hit and second.embedded == 0 and embedder.embedded == 0
    assert second.path == first.path
    np.testing.assert_array_equal(second.index.embeddings, first.index.embeddings)


@pytest.mark.parametrize("change", ["corpus", "max_characters", "model", "dimensions"])
def test_any_changed_input_misses_the_cache(tmp_path, change):
    corpus = make_corpus(tmp_path)
    key = cache_key(corpus.path, 6000, embedder_identity(emb_cfg()))
    if change == "corpus":
        corpus.path.write_text(corpus.path.read_text().replace("topic1 ", "topicX ", 1))
        other = cache_key(corpus.path, 6000, embedder_identity(emb_cfg()))
    elif change == "max_characters":
        other = cache_key(corpus.path, 100, embedder_identity(emb_cfg()))
    else:
        changed = emb_cfg(**{change: "other" if change == "model" else 32})
        other = cache_key(corpus.path, 6000, embedder_identity(changed))
    assert other != key


def test_corrupt_cache_is_rebuilt_not_trusted(tmp_path):
    corpus = make_corpus(tmp_path)
    first = build(tmp_path, corpus, CountingEmbedder())
    (first.path / "embeddings.npy").write_bytes(b"garbage")
    embedder = CountingEmbedder()
    again = build(tmp_path, corpus, embedder)
    assert not again.cache_hit and embedder.embedded == 30
    assert build(tmp_path, corpus, CountingEmbedder()).cache_hit  # and the rebuilt cache is good


def test_cache_of_another_embedder_is_never_reused(tmp_path):
    corpus = make_corpus(tmp_path)
    first = build(tmp_path, corpus, CountingEmbedder())
    meta = json.loads((first.path / "meta.json").read_text())
    meta["embedder"]["model"] = "someone-else"  # a cache dir whose contents disagree with its key
    (first.path / "meta.json").write_text(json.dumps(meta))
    assert not build(tmp_path, corpus, CountingEmbedder()).cache_hit


def test_passages_are_cut_at_max_characters(tmp_path):
    built = build(tmp_path, make_corpus(tmp_path), CountingEmbedder(), max_characters=12)
    assert max(map(len, built.index.passages)) == 12


def test_empty_corpus_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="empty"):
        build(tmp_path, Corpus([], [], tmp_path / "none.jsonl"), CountingEmbedder())


def test_faiss_above_threshold_agrees_with_brute_force():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3000, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    passages, ids = [f"p{i}" for i in range(3000)], list(range(3000))
    brute = Index(vectors, passages, ids, meta={}, brute_force_threshold=10**9)
    ivf = Index(vectors, passages, ids, meta={}, brute_force_threshold=1000)
    assert brute.faiss_index is None and ivf.faiss_index is not None
    queries = vectors[:50] + 0.01 * rng.normal(size=(50, 64)).astype(np.float32)
    agree = sum(b[0][0] == f[0][0] for b, f in zip(brute.search(queries, 5), ivf.search(queries, 5), strict=True))
    assert agree >= 48  # IVF-PQ finds the true nearest neighbour for (nearly) every query
    restored = pickle.loads(pickle.dumps(ivf))
    assert restored.search(queries[:5], 5) == ivf.search(queries[:5], 5)


def test_retriever_is_shared_by_deep_copies_and_pickles_without_model(tmp_path):
    corpus = make_corpus(tmp_path)
    built = build(tmp_path, corpus, CountingEmbedder())
    retriever = Retriever(built.index, CountingEmbedder(), k=3)
    assert copy.deepcopy(retriever) is retriever
    hits = retriever("topic7 thing 7")
    assert hits.doc_ids[0] == 1007 and len(hits.passages) == 3
    assert pickle.loads(pickle.dumps(retriever))("topic7 thing 7").doc_ids == hits.doc_ids


def test_excluded_passages_are_left_out_and_k_others_come_back(tmp_path):
    corpus = make_corpus(tmp_path)
    index = build(tmp_path, corpus, CountingEmbedder()).index
    retriever = Retriever(index, CountingEmbedder(), k=3)
    first = retriever("topic7 thing 7")
    again = retriever("topic7 thing 7", exclude=set(first.doc_ids))
    assert again.doc_ids == retriever("topic7 thing 7", k=6).doc_ids[3:]  # the next three, in rank order
    assert len(again.scores) == len(again.passages) == 3
    # A corpus without doc ids: passages are told apart by their text.
    unnamed = Retriever(Index(index.embeddings, index.passages, [None] * len(index.passages), meta={}),
                        CountingEmbedder(), k=3)
    hits = unnamed("topic7 thing 7", exclude=set(first.passages))
    assert hits.passages == again.passages and hits.doc_ids == [None] * 3


def test_local_embedder_runs_offline_and_pickles_small():
    embedder = LocalEmbedder()
    assert len(pickle.dumps(embedder)) < 500  # weights are never pickled
    vectors = embedder(["how do I undo a git commit", "reverting the last commit in git", "bake bread"])
    assert vectors.shape == (3, 384)
    sims = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)) @ vectors[0] / np.linalg.norm(vectors[0])
    assert sims[1] > sims[2]


def test_sample_corpus_gold_documents_are_retrievable(tmp_path):
    """On the shipped sample, cut as the embedded stack cuts it, MiniLM finds a gold document for most questions."""
    from pipelines.data import load_examples

    cfg = compose("rag")
    corpus, examples = load_corpus(cfg.data), load_examples(cfg.data)
    built = load_or_build_index(corpus, LocalEmbedder(), cfg.embedder, cfg.program.max_characters, tmp_path / "index")
    retriever = Retriever(built.index, LocalEmbedder(), k=5)
    found = sum(bool(set(retriever(ex.question).doc_ids) & set(ex.gold_doc_ids)) for ex in examples)
    assert found / len(examples) >= 0.7


def test_an_index_another_job_writes_meanwhile_is_kept(tmp_path, monkeypatch):
    import shutil

    from pipelines.retrieval import index as index_module

    corpus = make_corpus(tmp_path)
    theirs = build(tmp_path, corpus, CountingEmbedder())
    real_rmtree = shutil.rmtree

    def their_index_lands_first(path, *args, **kwargs):  # between our removal of the key and our rename
        if path != theirs.path:
            real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(index_module.shutil, "rmtree", their_index_lands_first)
    index_module.write_index(theirs.index, theirs.path)
    monkeypatch.undo()
    assert [p.name for p in theirs.path.parent.iterdir()] == [theirs.path.name]  # no temporary left behind
    assert build(tmp_path, corpus, CountingEmbedder()).cache_hit


def test_a_program_pickled_before_the_package_split_still_loads():
    """MLflow's `dspy` flavor pickles a program with its retriever, which names its classes by module path. The
    file holds a RAG program over a local-embedder retriever and a hosted embedder, pickled with cloudpickle (as
    DSPy saves a program) by the code of commit 7b20a63, when these classes lived in pipelines/retrieval.py."""
    from pipelines.programs import RAG
    from pipelines.retrieval.embedders import HostedEmbedder

    data = (Path(__file__).parent / "data" / "retrieval_before_split.pkl").read_bytes()
    assert b"pipelines.retrieval\x94" in data  # the classes' old module path, as the pickle names them
    loaded = pickle.loads(data)
    rag, hosted = loaded["rag"], loaded["hosted"]
    assert isinstance(rag, RAG) and isinstance(rag.retriever, Retriever) and isinstance(rag.retriever.index, Index)
    assert isinstance(rag.retriever.embedder.model, LocalEmbedder)
    hits = rag.retriever("how do I undo a git commit?")  # the index answers, the local model embeds the query
    assert hits.doc_ids[0] == 101 and len(hits.passages) == 2 and hits.passages[0].startswith("git revert")
    assert isinstance(hosted, HostedEmbedder) and hosted.api_key_env == "OPENAI_API_KEY" and hosted.batch_size == 16


def test_code_imports_retrieval_names_from_the_module_that_owns_them():
    """`pipelines.retrieval` resolves the pickled classes for old pickles only; no code imports through it."""
    root = Path(__file__).resolve().parents[2]
    modules = {p.stem for p in (root / "pipelines" / "retrieval").glob("*.py")}
    through_package = []
    for path in [p for folder in ("pipelines", "tests", "bench") for p in (root / folder).rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "pipelines.retrieval":
                through_package += [f"{path.relative_to(root)}: {a.name}" for a in node.names if a.name not in modules]
            elif isinstance(node, ast.ImportFrom) and node.module == "pipelines" or isinstance(node, ast.Import):
                through_package += [f"{path.relative_to(root)}: {a.name}" for a in node.names
                                    if a.name in ("retrieval", "pipelines.retrieval")]
    assert through_package == []
