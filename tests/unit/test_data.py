"""Data loaders: the shipped sample, the real files' format, downloads, and bad input."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipelines.config import compose
from pipelines.data import DataError, examples_hash, fetch, load_corpus, load_examples, load_splits, read_jsonl

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def data_cfg(**kw):
    cfg = OmegaConf.to_container(compose("config").data, resolve=True)
    cfg.update(kw)
    return OmegaConf.create(cfg)


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_sample_has_the_tutorial_format_and_real_gold_documents():
    cfg = data_cfg()
    examples, corpus = load_examples(cfg), load_corpus(cfg)
    assert len(examples) >= 40 and len(corpus.texts) >= 150
    first = json.loads(Path(cfg.examples).read_text().splitlines()[0])
    assert list(first) == ["question", "response", "gold_doc_ids"]
    assert list(json.loads(Path(cfg.corpus).read_text().splitlines()[0])) == ["doc_id", "author", "text"]
    ids = set(corpus.doc_ids)
    for ex in examples:
        assert ex.gold_doc_ids and set(ex.gold_doc_ids) <= ids, ex.question
        assert len(ex.response.split(". ")) >= 2, f"gold answer should be multi-sentence: {ex.question}"


@pytest.mark.skipif(not SHARED.exists(), reason="shared/data (real file heads) not beside the clone")
def test_loaders_read_the_real_files_format(tmp_path):
    cfg = data_cfg(examples=str(SHARED / "ragqa_arena_tech_examples.head10.jsonl"),
                   corpus=str(SHARED / "ragqa_arena_tech_corpus.sample10.jsonl"),
                   train_size=4, dev_size=3, test_size=3)
    splits = load_splits(cfg)
    assert [len(splits.train), len(splits.dev), len(splits.test)] == [4, 3, 3]
    assert set(splits.dev[0].inputs().keys()) == {"question"}
    corpus = load_corpus(cfg)
    assert corpus.has_doc_ids and all(isinstance(d, int) for d in corpus.doc_ids)


def test_splits_are_a_deterministic_shuffle_without_overlap():
    cfg = data_cfg(train_size=10, dev_size=10, test_size=10)
    a, b = load_splits(cfg), load_splits(cfg)
    assert [e.question for e in a.dev] == [e.question for e in b.dev]
    questions = [e.question for split in (a.train, a.dev, a.test) for e in split]
    assert len(set(questions)) == 30
    assert examples_hash(a.dev) == examples_hash(b.dev) != examples_hash(a.test)
    assert [e.question for e in load_splits(data_cfg(shuffle_seed=1, train_size=10, dev_size=10,
                                                     test_size=10)).dev] != [e.question for e in a.dev]


def test_split_sizes_larger_than_the_data_are_refused():
    with pytest.raises(DataError, match="exceed the"):
        load_splits(data_cfg(train_size=1000))


def test_bad_json_line_names_file_and_line(tmp_path):
    path = write(tmp_path / "ex.jsonl", [{"question": "q", "response": "r"}, "{not json"])
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON"):
        read_jsonl(path, ("question",))


def test_missing_question_names_file_and_line(tmp_path):
    path = write(tmp_path / "ex.jsonl", [{"question": "q", "response": "r"}, {"response": "r"}])
    with pytest.raises(DataError, match=rf"{path}:2: missing or empty field\(s\) question"):
        load_examples(data_cfg(examples=str(path)))


def test_corpus_problems_are_reported(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no records"):
        load_corpus(data_cfg(corpus=str(empty)))
    no_text = write(tmp_path / "c1.jsonl", [{"doc_id": 1, "text": "a"}, {"doc_id": 2, "author": "x"}])
    with pytest.raises(DataError, match=r"c1.jsonl:2: missing or empty field\(s\) text"):
        load_corpus(data_cfg(corpus=str(no_text)))
    dup = write(tmp_path / "c2.jsonl", [{"doc_id": 1, "text": "a"}, {"doc_id": 1, "text": "b"}])
    with pytest.raises(DataError, match=r"c2.jsonl:2: duplicate doc_id 1 \(first at line 1\)"):
        load_corpus(data_cfg(corpus=str(dup)))


def test_missing_file_without_url_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        fetch(tmp_path / "nope.jsonl", None)


def test_download_once_then_redownload_when_truncated(tmp_path):
    source = write(tmp_path / "remote.jsonl", [{"question": f"q{i}", "response": "r"} for i in range(50)])
    target = tmp_path / "cache" / "examples.jsonl"
    assert fetch(target, source.as_uri()).read_bytes() == source.read_bytes()
    mtime = target.stat().st_mtime_ns
    fetch(target, source.as_uri())
    assert target.stat().st_mtime_ns == mtime  # cached: not downloaded again
    target.write_bytes(source.read_bytes()[:100])  # truncated after the fact
    assert fetch(target, source.as_uri()).read_bytes() == source.read_bytes()
    target.write_bytes(b"x")
    with pytest.raises(DataError, match="corrupt or truncated"):
        fetch(target, None)


def test_failed_download_leaves_nothing_behind(tmp_path):
    target = tmp_path / "examples.jsonl"
    with pytest.raises(DataError, match="could not download"):
        fetch(target, (tmp_path / "missing.jsonl").as_uri())
    assert list(tmp_path.iterdir()) == []
