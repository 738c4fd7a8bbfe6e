"""`mlflow run . -e predict`: a logged program answers a file of questions on Spark; one run records it."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.errors import ConfigError
from pipelines.scale import batch, spark
from pipelines.steps.results import PredictResult
from pipelines.tracking.evaluation import log_spark_input
from pipelines.tracking.models import check_model, program_udf
from pipelines.tracking.registry import registered_version
from pipelines.tracking.reports import log_predictions
from pipelines.tracking.runs import run
from pipelines.tracking.store import setup
from pipelines.tracking.traces import executor_tracing

if TYPE_CHECKING:
    from pipelines.schema import Config


log = logging.getLogger(__name__)


def run_predict(cfg: Config) -> PredictResult:
    """Answer every question of `input` with the program at `model_uri` on Spark; write them to `output`.
    Bad input, an existing output, no Java or no such model stop before any run opens."""
    missing = [key for key in ("model_uri", "input", "output") if not cfg.get(key)]
    if missing:
        raise ConfigError(f"predict needs {' '.join(f'{k}=...' for k in missing)} (e.g. "
                          "model_uri=models:/NAME@champion input=questions.jsonl output=predictions/)")
    source = batch.check_input(cfg.input)
    output = batch.check_output(cfg.output, overwrite=cfg.overwrite)
    spark.java_home(Path(cfg.paths.cache))
    setup(cfg)
    check_model(cfg.model_uri)
    version = registered_version(cfg.model_uri)
    tags = {"model_uri": cfg.model_uri, **({"model_version": f"{version[0]}/{version[1]}"} if version else {})}
    with run("predict", cfg, tags=tags) as active:
        session = spark.session(cfg)
        frame = batch.read(session, source)
        log_spark_input(frame, source.path)
        udf = functools.partial(program_udf, session, cfg.model_uri, num_threads=cfg.num_threads,
                                executor_env=executor_tracing())
        predictions = batch.predict(session, frame, udf, output, output_format=cfg.output_format,
                                    partitions=cfg.spark.partitions)
        log_predictions(predictions, output=output, output_format=cfg.output_format,
                        executors=spark.executors(session))
        result = PredictResult(run_id=active.info.run_id, predictions=predictions, output=output)
        log.info("predict: %s", result.headline())
        return result
