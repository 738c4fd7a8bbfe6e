"""People's labels of traces: read from a file, checked, and gathered per trace.

A label is yes/no (yes, no, pass, fail, true, false, correct, incorrect, 1, 0) or a number in [0, 1]; a file
holds one kind. Labels by several reviewers of one trace stay separate records (`by_reviewer`); `by_trace`
gives each trace's majority (yes/no) or mean (numeric), whether its reviewers disagreed, and the comments
given for the majority's verdict.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import ujson

from pipelines.errors import ConfigError

YES = {"yes", "pass", "true", "correct", "1"}
NO = {"no", "fail", "false", "incorrect", "0"}
FILE_REVIEWER = "labels-file"


@dataclass(frozen=True)
class Label:
    trace_id: str
    value: bool | float
    reviewer: str = FILE_REVIEWER
    rationale: str | None = None


@dataclass(frozen=True)
class Consensus:
    """A trace's labels taken together: the majority (or mean) and how many reviewers, agreeing or not."""

    value: bool | float | None  # None: reviewers split evenly on yes/no
    reviewers: int
    disagree: bool              # yes and no both given, or numbers more than 0.25 apart
    rationale: str | None = None  # yes/no: the comments of the reviewers on the majority's side, joined


def read(path: Path) -> list[Label]:
    """Labels from a CSV (header: trace_id,label[,rationale][,reviewer]) or JSONL file; one line naming the
    file, the line and what to fix where a row is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"labels={path}: no such file")
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = [(i, row) for i, row in enumerate(csv.DictReader(f), start=2)]
    elif path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            rows = [(i, ujson.loads(line)) for i, line in enumerate(f, start=1) if line.strip()]
    else:
        raise ConfigError(f"labels={path}: a .csv or .jsonl file of trace_id,label[,rationale][,reviewer]")
    if not rows:
        raise ConfigError(f"labels={path}: no labels in it")
    texts = [str(row.get("label", "")).strip().lower() for _, row in rows]
    yes_no = all(t in YES | NO for t in texts)
    labels = []
    for (line, row), text in zip(rows, texts, strict=True):
        if not row.get("trace_id"):
            raise ConfigError(f"{path}:{line}: no trace_id")
        value = (text in YES) if yes_no else _number(text, path, line)
        labels.append(Label(trace_id=str(row["trace_id"]).strip(), value=value,
                            reviewer=str(row.get("reviewer") or FILE_REVIEWER), rationale=row.get("rationale") or None))
    return labels


def coerce(value) -> bool | float | None:
    """A label as stored on a trace (True/False, 0-1, or a word such as `pass`) as a label value; None
    where it is neither."""
    if isinstance(value, bool) or value is None:
        return value
    text = str(value).strip().lower()
    if text in YES | NO:
        return text in YES
    try:
        number = float(text)
    except ValueError:
        return None
    return number if 0.0 <= number <= 1.0 else None


def _number(text: str, path: Path, line: int) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{path}:{line}: label {text!r} is out of range: yes/no (pass/fail, true/false, 1/0) "
                          "or a number in [0, 1], one kind per file")
    return value


def by_reviewer(labels: list[Label]) -> dict[str, dict[str, Label]]:
    """Each trace's labels by reviewer, a reviewer's last label on a trace being the one that counts."""
    found: dict[str, dict[str, Label]] = defaultdict(dict)
    for label in labels:
        found[label.trace_id][label.reviewer] = label
    return dict(found)


def by_trace(labels: list[Label]) -> dict[str, Consensus]:
    """Each trace's consensus over its reviewers, each reviewer's last label counting once. Yes/no labels
    whose reviewers split evenly have no majority: value None."""
    result = {}
    for trace_id, given in by_reviewer(labels).items():
        values = [x.value for x in given.values()]
        if all(isinstance(v, bool) for v in values):
            yes = sum(values)
            value = None if 2 * yes == len(values) else 2 * yes > len(values)
            said = "; ".join(x.rationale for x in given.values() if x.rationale and x.value == value)
            result[trace_id] = Consensus(value, len(values), 0 < yes < len(values), said or None)
        else:
            result[trace_id] = Consensus(sum(values) / len(values), len(values), max(values) - min(values) > 0.25)
    return result
