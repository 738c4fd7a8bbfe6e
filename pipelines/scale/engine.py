"""Where a batch of work runs: in this process (DSPy's threads) or on Spark's executors (`engine=spark`,
`index.engine=spark`). Either way the driver gets the same rows back, in order, and does everything
after (aggregates, intervals, comparisons, logging) exactly as for a local run.

On Spark, a program travels as the plain files of `pipelines/packaging.py` (shipped with
`SparkContext.addFile`) and is rebuilt once per executor process; LMs and embedders travel as their
settings, never a key (keys come from the executors' environment, `pipelines/scale/spark.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import dspy
import numpy as np

from pipelines import packaging
from pipelines.evaluation.result import EvalResult
from pipelines.evaluation.scoring import Scorer, evaluate

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import SparkSession

# What each executor process has rebuilt, by the name its files were shipped under.
_loaded: dict[str, Any] = {}


class ExecutorTracer(Protocol):
    """How executors trace an evaluation, given by the caller (it travels with the job, so it pickles):
    `on_executor()` traces the calls inside and yields the function that tells a row's trace id."""

    def on_executor(self) -> contextlib.AbstractContextManager[Callable[[], str | None]]: ...


def evaluate_on_spark(spark: SparkSession, program: dspy.Module, examples: list[dspy.Example], scorer: Scorer, *,
                      lm: dspy.LM, adapter: dspy.Adapter, num_threads: int, partitions: int | None = None,
                      cache_dir: str | None = None, tracing: ExecutorTracer | None = None) -> EvalResult:
    """`scoring.evaluate` of `program` (answering through `lm` and `adapter`) with `scorer`, its examples
    spread over Spark tasks; each executor answers and scores its share on `num_threads` threads.
    `tracing`: how executors trace, or None for no traces."""
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        name = f"program-{uuid.uuid4().hex[:12]}"
        packaging.save(program, lm, adapter, Path(tmp) / name)
        # One file: Spark ships directories only to a local master.
        spark.sparkContext.addFile(shutil.make_archive(str(Path(tmp) / name), "zip", Path(tmp) / name))
        state = None
        if scorer.scoring.judge:  # the aligned judge's state is a file on this machine: it travels as one too
            state = f"{name}-judge.json"
            spark.sparkContext.addFile(shutil.copy(scorer.scoring.judge, str(Path(tmp) / state)))
        judge = scorer.judge.judge_lm if scorer.judge else None
        job = {"program": name, "scoring": scorer.scoring, "judge_state": state, "num_threads": num_threads,
               "judge": packaging.lm_spec(judge) if judge is not None else None, "cache_dir": cache_dir,
               "tracing": tracing}
        frame = pd.DataFrame({"position": range(len(examples)),
                              "example": [json.dumps(dict(e), default=list) for e in examples]})
        rows = _collect(spark, frame, _evaluate_partition(job), "position long, row string, judge_failures long",
                        partitions)
    results = [json.loads(r) for r in rows["row"]]
    return EvalResult.from_rows(results, scorer.scoring, judge_failures=int(rows["judge_failures"].sum()),
                                judge=judge.model if judge is not None else None)


def _evaluate_partition(job: dict[str, Any]) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import pandas as pd
        from pyspark import SparkFiles

        packaged = _program(job["program"], job["cache_dir"])
        scoring = job["scoring"]
        if job["judge_state"]:
            scoring = dataclasses.replace(scoring, judge=SparkFiles.get(job["judge_state"]))
        judge = packaging.restore_lm(job["judge"]) if job["judge"] else None
        scorer = Scorer.with_judges(scoring, judge)
        tracing = job["tracing"]
        with tracing.on_executor() if tracing is not None else contextlib.nullcontext() as trace_id:
            for batch in batches:
                examples = [dspy.Example(**json.loads(e)).with_inputs("question") for e in batch["example"]]
                with dspy.context(lm=packaged.lm, adapter=packaged.adapter):
                    result = evaluate(packaged.program, examples, scorer, num_threads=job["num_threads"],
                                      progress=False, trace_id=trace_id)
                failures = [result.judge_failures] + [0] * (len(batch) - 1)  # the batch's count, once
                yield pd.DataFrame({"position": batch["position"], "judge_failures": failures,
                                    "row": [json.dumps(r, default=list) for r in result.rows]})
    return run


def _program(name: str, cache_dir: str | None) -> packaging.Packaged:
    """The shipped program, rebuilt once per executor process (Python workers are reused across tasks)."""
    if name not in _loaded:
        from pyspark import SparkFiles

        if cache_dir:  # LM responses from the same cache as the driver's, where the executor can reach it
            dspy.configure_cache(disk_cache_dir=cache_dir)
        files = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        shutil.unpack_archive(SparkFiles.get(f"{name}.zip"), files)
        _loaded[name] = packaging.load(files)
    return _loaded[name]


def embed_on_spark(spark: SparkSession, texts: list[str], embedder_spec: dict[str, Any], *,
                   partitions: int | None = None) -> np.ndarray:
    """The embeddings of `texts`, in order, computed in Spark tasks by the embedder `embedder_spec`
    describes (`packaging.embedder_spec`)."""
    import pandas as pd

    frame = pd.DataFrame({"position": range(len(texts)), "text": texts})
    rows = _collect(spark, frame, _embed_partition(embedder_spec), "position long, vector array<float>", partitions)
    return np.asarray(rows["vector"].tolist(), dtype=np.float32)


def _embed_partition(spec: dict[str, Any]) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import pandas as pd

        key = json.dumps(spec, sort_keys=True)
        if key not in _loaded:  # the embedding model loads once per executor process
            _loaded[key] = packaging.restore_embedder(spec)
        embedder = _loaded[key]
        for batch in batches:
            vectors = np.asarray(embedder(batch["text"].tolist()), dtype=np.float32)
            yield pd.DataFrame({"position": batch["position"], "vector": list(vectors)})
    return run


def _collect(spark: SparkSession, frame: pd.DataFrame, function, schema: str, partitions: int | None) -> pd.DataFrame:
    """`function` over `frame`'s rows in Spark tasks (contiguous ranges, one per task), gathered back on
    the driver in the frame's order (its `position` column)."""
    tasks = min(len(frame), partitions or spark.sparkContext.defaultParallelism) or 1
    spread = spark.createDataFrame(frame).repartitionByRange(tasks, "position")
    return spread.mapInPandas(function, schema).toPandas().sort_values("position").reset_index(drop=True)
