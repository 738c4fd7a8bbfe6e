"""A file of questions answered by a logged program on Spark: checked before anything starts, read by
Spark, answered through `mlflow.pyfunc.spark_udf`, written atomically.

Input: JSONL, CSV or Parquet (a file, or a directory of part files as Spark writes them) with a
`question` column; other columns (an id, say) travel through to the output. Output: a directory of
Parquet or JSONL part files, in input order, one row per question with the program's outputs,
`error` ("" when it answered) and `trace_id` ("" when executors do not trace). It appears under its
name only once complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.errors import ConfigError
from pipelines.packaging import ERROR, TRACE_ID
from pipelines.programs import ALL_OUTPUTS

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
ROW = "_row"  # input order, kept through the shuffle that spreads rows over executors
SAMPLE_ROWS = 20


@dataclass(frozen=True, kw_only=True)
class Source:
    path: Path
    format: str       # json | csv | parquet: Spark's reader
    columns: list[str]


@dataclass(frozen=True, kw_only=True)
class Predictions:
    rows: int
    failed: int
    seconds: float
    sample: pd.DataFrame


def check_input(path: str) -> Source:
    """The input's format and columns, read from its head: a missing or unreadable file, an unknown
    format, no `question` column or no rows are one-line errors, before any Spark or run starts."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise ConfigError(f"input={path}: no such file or directory")
    files = sorted(p for p in path.iterdir() if p.suffix in FORMATS) if path.is_dir() else [path]
    suffixes = {p.suffix for p in files}
    if not files or len({FORMATS.get(s) for s in suffixes}) != 1 or None in {FORMATS.get(s) for s in suffixes}:
        raise ConfigError(f"input={path}: expected a .jsonl, .csv or .parquet file (or a directory of them)")
    fmt = FORMATS[files[0].suffix]
    try:
        columns, has_rows = _peek(files, fmt)
    except (OSError, ValueError) as e:
        raise ConfigError(f"input={path}: cannot read it as {fmt} ({type(e).__name__}: {e})") from None
    if not has_rows:
        raise ConfigError(f"input={path} has no rows")
    if "question" not in columns:
        raise ConfigError(f"input={path} has no `question` column (columns: {', '.join(columns)}); "
                          "rename the column that holds the questions")
    clashes = [c for c in columns if c in (*ALL_OUTPUTS, ERROR, TRACE_ID, ROW)]
    if clashes:
        raise ConfigError(f"input={path}: column(s) {', '.join(clashes)} would be overwritten by the predictions; "
                          "rename them")
    return Source(path=path, format=fmt, columns=columns)


def _peek(files: list[Path], fmt: str) -> tuple[list[str], bool]:
    """Column names, and whether there is at least one row, without reading whole files."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        metas = [pq.read_metadata(f) for f in files]
        return list(metas[0].schema.names), any(m.num_rows for m in metas)
    if fmt == "csv":
        import pandas as pd

        heads = [pd.read_csv(f, nrows=1) for f in files]
        return list(heads[0].columns), any(len(h) for h in heads)
    for f in files:
        with open(f, encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError(f"{f}: a line is not a JSON object")
                    return list(record), True
    return [], False


def check_output(path: str, *, overwrite: bool) -> Path:
    path = Path(path).expanduser().resolve()
    if path.exists() and not overwrite:
        raise ConfigError(f"output={path} exists; choose another directory or set overwrite=true")
    if not path.parent.is_dir():
        raise ConfigError(f"output={path}: its parent directory does not exist")
    return path


def read(spark: SparkSession, source: Source) -> DataFrame:
    reader = spark.read.option("header", True) if source.format == "csv" else spark.read
    return getattr(reader, source.format)(str(source.path))


def predict(spark: SparkSession, frame: DataFrame, model_udf: Callable[[], Any], output: Path, *,
            output_format: str, partitions: int | None) -> Predictions:
    """Every row of `frame` answered on Spark's executors by the model `model_udf` makes (a `spark_udf`,
    `pipelines.tracking.models.program_udf`; its load is timed with the answers), written to `output`."""
    from pyspark.sql import functions as F

    started = time.monotonic()
    udf = model_udf()
    columns = frame.columns
    # Contiguous ranges of rows per task, in order, so the part files keep the input's order; ranged
    # before the model runs (a sort after it would run the model again to sample the sort's bounds).
    spread = (frame.withColumn(ROW, F.monotonically_increasing_id())
              .repartitionByRange(partitions or spark.sparkContext.defaultParallelism, ROW).sortWithinPartitions(ROW))
    answered = spread.withColumn("_prediction", udf(F.struct("question"))).select(*columns, "_prediction.*")
    tmp = output.with_name(f".{output.name}.{uuid.uuid4().hex[:8]}.part")
    writer = answered.write.mode("errorifexists")
    try:
        (writer.parquet if output_format == "parquet" else writer.json)(str(tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written output left beside the real one
        raise
    _replace(tmp, output)
    seconds = time.monotonic() - started
    written = spark.read.parquet(str(output)) if output_format == "parquet" else spark.read.json(str(output))
    counts = written.agg(F.count("*").alias("rows"), F.sum((F.col(ERROR) != "").cast("int")).alias("failed")).first()
    return Predictions(rows=counts["rows"], failed=counts["failed"] or 0, seconds=seconds,
                       sample=_head(output, output_format, SAMPLE_ROWS))


def _head(output: Path, output_format: str, n: int) -> pd.DataFrame:
    """The first `n` rows of the written output, from its part files in order (Spark reads them back in
    whatever order it packs them)."""
    import pandas as pd

    frames, rows = [], 0
    for part in sorted(output.glob("part-*")):
        frame = pd.read_parquet(part) if output_format == "parquet" else pd.read_json(part, lines=True)
        frames.append(frame.head(n - rows))
        rows += len(frames[-1])
        if rows >= n:
            break
    return pd.concat(frames, ignore_index=True)


def _replace(tmp: Path, output: Path) -> None:
    """Put the finished `tmp` under `output`'s name; an old `output` (overwrite=true) goes only then."""
    old = output.with_name(f".{output.name}.{uuid.uuid4().hex[:8]}.old")
    if output.exists():
        os.replace(output, old)
    os.replace(tmp, output)
    shutil.rmtree(old, ignore_errors=True)
