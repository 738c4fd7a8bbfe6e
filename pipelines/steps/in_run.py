"""What a step does inside its run: score a program (traced, logged, the LM server watched), log and
register it, and open the run with the datasets and index every training step logs first."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dspy

from pipelines.data import examples_hash
from pipelines.errors import LMServerError
from pipelines.evaluation.result import EvalResult
from pipelines.evaluation.scoring import evaluate
from pipelines.programs import doc_id_type, program_lm
from pipelines.scale import engine, spark
from pipelines.schema import Engine
from pipelines.server import healthy
from pipelines.steps.session import Session
from pipelines.tracking.evaluation import log_datasets, log_evaluation
from pipelines.tracking.models import log_program, program_signature
from pipelines.tracking.prompts import link_prompts, register_prompts
from pipelines.tracking.registry import register
from pipelines.tracking.reports import log_index
from pipelines.tracking.runs import run
from pipelines.tracking.traces import evaluating, evaluation_tracing, held, last_trace_id, watch_traces
from pipelines.tracking.usage import timed

if TYPE_CHECKING:
    from mlflow import ActiveRun
    from mlflow.data.pandas_dataset import PandasDataset
    from mlflow.entities import LoggedModel


log = logging.getLogger(__name__)


def score(session: Session, program: dspy.Module, examples: list[dspy.Example], *, step: str, split: str,
          model: LoggedModel | None, dataset: PandasDataset | None = None, prefix: str = "",
          **trace_tags: str) -> EvalResult:
    """Evaluate `program` (the LoggedModel `model`) on `examples` in `step`'s run: traces linked to the
    model and tagged; metrics, table and assessments logged; then fail loudly if the LM server died
    underneath us."""
    cfg, tracing = session.cfg, session.cfg.tracking
    on_spark = cfg.engine == Engine.spark
    where = evaluation_tracing(model, split=split, **trace_tags) if on_spark and tracing.log_traces else None
    traced = tracing.log_traces and (where is not None or not on_spark)
    # Executors do not trace the judge: one trace per example there.
    traces_per_example = (1 + bool(tracing.trace_judge and not on_spark)) if traced else 0
    with watch_traces(len(examples) * traces_per_example, prefix), timed(f"{prefix}evaluate"), \
            held():  # traces wait here for their assessments, then are written with them
        with evaluating(model, split=split, **trace_tags):
            if on_spark:  # the program answers through whatever LM and adapter DSPy is configured with, as here
                result = engine.evaluate_on_spark(spark.session(cfg), program, examples, session.scorer,
                                                  lm=dspy.settings.lm, adapter=dspy.settings.adapter,
                                                  num_threads=cfg.num_threads, partitions=cfg.spark.partitions,
                                                  cache_dir=str(Path(cfg.paths.cache) / "dspy"), tracing=where)
            else:
                result = evaluate(program, examples, session.scorer, num_threads=cfg.num_threads,
                                  trace_id=last_trace_id if tracing.log_traces else None)
        log_evaluation(result, split=split, prefix=prefix, model=model, dataset=dataset)
    log.info("%s %s%s: %s", step, prefix, split, result.summary())
    base = session.lm.kwargs.get("api_base")
    if result.failed and base and not healthy(base):
        raise LMServerError(f"the LM server at {base} stopped answering during evaluation; "
                            f"{result.failed} of {result.num_examples} examples failed (table logged)")
    return result


def log_and_register(session: Session, program: dspy.Module, result: EvalResult, *, variant: str,
                     model: LoggedModel, tags: dict[str, str] | None = None) -> tuple[str, str | None]:
    """Log the program into `model`, answering through its predictors' own LM (a finetuned one) or the
    session's; register it, and its predictors' prompts, whose `champion` alias follows the program's.
    `tags` (its teacher, its adapter) go on the registered version too."""
    registered = session.cfg.tracking.registered_model
    prompts = register_prompts(program, registered_model=registered, variant=variant) if registered else []
    signature = program_signature(program, doc_id_type=doc_id_type(program),
                                  num_threads=session.cfg.num_threads)
    with timed("log_model"):
        info = log_program(program, lm=program_lm(program) or session.lm, adapter=session.adapter, model=model,
                           signature=signature, dspy_flavor=session.cfg.tracking.dspy_flavor, prompts=prompts)
    if not registered:
        return info.model_uri, None
    with timed("register"):
        registration = register(info.model_uri, registered_model=registered, model_id=model.model_id,
                                result=result, dev_set=examples_hash(session.splits.dev), variant=variant,
                                scoring=session.scoring, tags=tags)
    link_prompts(prompts, registered_model=registered, version=registration.version,
                 promoted=registration.promoted)
    return info.model_uri, registration.version


@contextlib.contextmanager
def step_run(session: Session, name: str, *, variant: str, index_info: dict[str, Any] | None,
             tags: dict[str, str] | None = None) -> Iterator[tuple[ActiveRun, dict[str, PandasDataset]]]:
    """A step's run with what every training step logs first: the train/dev datasets and the index."""
    with run(name, session.cfg, tags={"variant": variant, **(tags or {})}) as active:
        datasets = log_datasets({"train": session.splits.train, "dev": session.splits.dev},
                                session.cfg.data)
        if index_info:
            log_index(index_info["path"], index_info)
        yield active, datasets
