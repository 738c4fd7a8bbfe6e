"""LoRA adapters on disk, by content: a file named after its SHA-256, written once, atomically.

A finetuned program's LM names its adapter by path; a program pickled elsewhere carries the adapter's
bytes and puts them back here (`store`) when it is loaded, so the same adapter is one file per machine.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

SUFFIX = ".gguf"


def default_dir() -> Path:
    return Path(os.environ.get("RAGQA_ADAPTER_DIR", Path.home() / ".cache" / "ragqa-dspy" / "adapters"))


def digest(path: Path) -> str:
    """SHA-256 of a file, or of a directory's files with their relative names (a model directory)."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
    for file in files:
        if file != Path(path):
            h.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):  # noqa: B023 (f is used at once)
                h.update(block)
    return h.hexdigest()


def store(data: bytes, directory: Path | None = None) -> Path:
    """The adapter `data` as `<directory>/<sha256>.gguf`, written unless it is there already."""
    directory = Path(directory or default_dir())
    path = directory / f"{hashlib.sha256(data).hexdigest()}{SUFFIX}"
    if not path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".adapter-", delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, path)
    return path


def adopt(written: Path, directory: Path) -> Path:
    """Move a freshly written adapter file to its content address in `directory`."""
    path = directory / f"{digest(written)}{SUFFIX}"
    directory.mkdir(parents=True, exist_ok=True)
    os.replace(written, path)
    return path
