"""RAG-QA Arena files: download once, read and validate, shuffle into the tutorial's splits."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import dspy
import ujson
from tqdm.auto import tqdm

from pipelines.errors import ConfigError
from pipelines.schema import DataConfig, Split

log = logging.getLogger(__name__)


class DataError(ConfigError):
    """Malformed or missing data; the message names the file and line."""


@dataclass(frozen=True)
class Corpus:
    texts: list[str]
    doc_ids: list[int | str | None]
    path: Path

    @property
    def has_doc_ids(self) -> bool:
        return all(d is not None for d in self.doc_ids)


@dataclass(frozen=True)
class Splits:
    train: list[dspy.Example]
    dev: list[dspy.Example]
    test: list[dspy.Example]

    def get(self, name: Split) -> list[dspy.Example]:
        return getattr(self, Split(name))


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fetch(path: str | Path, url: str | None) -> Path:
    """Return `path`, downloading `url` into it first when it is missing or was left incomplete.

    A download lands in a temporary file and is renamed only once complete; a `.sha256` sidecar then
    records it, so a file truncated later (or by a crashed copy) is detected and fetched again.
    """
    path = Path(path)
    sidecar = path.with_name(path.name + ".sha256")
    if path.exists():
        if not sidecar.exists() or sidecar.read_text().strip() == sha256_file(path):
            return path
        if not url:
            raise DataError(f"{path}: content does not match {sidecar}; the file is corrupt or truncated")
        log.warning("%s does not match its recorded checksum; downloading it again", path)
    elif not url:
        raise DataError(f"{path}: no such file (and no URL configured to download it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0)
            with open(tmp, "wb") as out, tqdm(total=total or None, unit="B", unit_scale=True,
                                              desc=f"download {path.name}") as bar:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
        if total and tmp.stat().st_size != total:
            raise DataError(f"{url}: got {tmp.stat().st_size} of {total} bytes")
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"could not download {url} to {path}: {e}") from e
    os.replace(tmp, path)
    sidecar.write_text(sha256_file(path))
    return path


def read_jsonl(path: str | Path, required: tuple[str, ...]) -> list[dict]:
    """Parse a JSONL file; any bad line or missing field is reported as `file:line: problem`."""
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = ujson.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object")
            missing = [k for k in required if not isinstance(row.get(k), str) or not row[k].strip()]
            if missing:
                raise DataError(f"{path}:{lineno}: missing or empty field(s) {', '.join(missing)}")
            row["_line"] = lineno
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no records")
    return rows


def load_examples(data_cfg: DataConfig) -> list[dspy.Example]:
    path = fetch(data_cfg.examples, data_cfg.get("examples_url"))
    rows = read_jsonl(path, required=("question", "response"))
    examples = []
    for row in rows:
        row.pop("_line")
        examples.append(dspy.Example(**row).with_inputs("question"))
    return examples


def load_splits(data_cfg: DataConfig) -> Splits:
    """Shuffle with `random.Random(seed)` and cut train/dev/test in that order, as the tutorial does."""
    examples = load_examples(data_cfg)
    sizes = (data_cfg.train_size, data_cfg.dev_size, data_cfg.test_size)
    if sum(sizes) > len(examples):
        raise DataError(f"data splits train={sizes[0]} + dev={sizes[1]} + test={sizes[2]} = {sum(sizes)} "
                        f"exceed the {len(examples)} examples in {data_cfg.examples}")
    random.Random(data_cfg.shuffle_seed).shuffle(examples)
    a, b = sizes[0], sizes[0] + sizes[1]
    return Splits(train=examples[:a], dev=examples[a:b], test=examples[b:b + sizes[2]])


def load_corpus(data_cfg: DataConfig) -> Corpus:
    path = fetch(data_cfg.corpus, data_cfg.get("corpus_url"))
    rows = read_jsonl(path, required=("text",))
    seen: dict = {}
    for row in rows:
        doc_id = row.get("doc_id")
        if doc_id is not None and doc_id in seen:
            raise DataError(f"{path}:{row['_line']}: duplicate doc_id {doc_id} (first at line {seen[doc_id]})")
        seen[doc_id] = row["_line"]
    return Corpus(texts=[r["text"] for r in rows], doc_ids=[r.get("doc_id") for r in rows], path=path)


def examples_hash(examples: list[dspy.Example]) -> str:
    """Content hash of a split, so scores are compared only on the same examples."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(ujson.dumps([ex.question, ex.response], ensure_ascii=False).encode())
    return digest.hexdigest()[:16]
