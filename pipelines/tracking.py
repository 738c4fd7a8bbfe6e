"""The one module that talks to MLflow: runs, params, metrics, tables, datasets, models, registry."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import dspy
import mlflow
import pandas as pd
import yaml
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema

from pipelines.config import PROJECT_ROOT, flatten, to_container
from pipelines.scoring import EvalResult, mean_recall

log = logging.getLogger(__name__)

CHAMPION = "champion"
MAX_PARAM_CHARS = 6000


def setup(cfg) -> None:
    """Point MLflow at the configured store and turn on DSPy autologging."""
    # Synchronous trace export keeps metric feedback attached to traces.
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")
    size_connection_pool(max(int(cfg.num_threads), int(cfg.optimizer.get("num_threads") or 0)))
    mlflow.set_tracking_uri(cfg.tracking.uri)
    _init_store(str(cfg.tracking.uri))
    if not os.environ.get("MLFLOW_RUN_ID") and not os.environ.get("MLFLOW_EXPERIMENT_ID"):
        name = cfg.tracking.experiment
        local_store = str(cfg.tracking.uri).startswith(("sqlite:", "file:"))
        if local_store and cfg.tracking.get("artifact_location") and mlflow.get_experiment_by_name(name) is None:
            # Artifacts next to the store, not wherever the first run happened to start.
            with contextlib.suppress(mlflow.exceptions.MlflowException):  # created concurrently
                mlflow.create_experiment(name, artifact_location=Path(cfg.tracking.artifact_location).as_uri())
        mlflow.set_experiment(name)
    mlflow.dspy.autolog(log_traces=bool(cfg.tracking.log_traces), log_traces_from_eval=True,
                        log_traces_from_compile=False, log_compiles=bool(cfg.tracking.log_compiles),
                        log_evals=bool(cfg.tracking.log_compiles), silent=True)


def size_connection_pool(threads: int) -> None:
    """Give every exporting thread the two store connections it may hold at once.

    Each evaluation thread exports its own traces, and MLflow's `start_trace` holds one pooled
    connection while it checks out a second; with more threads than the pool (5 + 10 overflow by
    default) they wait on each other until the pool's 30 s timeout, and the timed-out traces are
    dropped. Must run before the store's engine exists; a user's own setting wins.
    """
    os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", str(max(5, 2 * threads + 2)))
    os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW", str(max(10, threads)))


def _init_store(uri: str) -> None:
    """Create/migrate a sqlite store under a file lock: two jobs racing on a new store otherwise
    collide in MLflow's schema migration."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        mlflow.search_experiments(max_results=1)


@contextlib.contextmanager
def run(name: str, cfg, tags: dict[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """Open this step's run: the `mlflow run` run, a child of an active run, or a new one.

    Whatever happens inside, the run ends in a consistent state: FINISHED, FAILED (with the error
    as a tag), or KILLED on Ctrl-C.
    """
    parent = mlflow.active_run()
    if parent is not None:
        active = mlflow.start_run(run_name=name, nested=True)
    elif os.environ.get("MLFLOW_RUN_ID"):
        active = mlflow.start_run()
    else:
        active = mlflow.start_run(run_name=name)
    try:
        mlflow.set_tags({"step": name, **(tags or {})})
        log_config(cfg)
        yield active
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException as e:
        with contextlib.suppress(Exception):
            mlflow.set_tag("error", f"{type(e).__name__}: {e}"[:5000])
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


def log_config(cfg) -> None:
    """The resolved config as an artifact and as flattened params, with secrets removed."""
    tree = to_container(cfg)
    tree.pop("hydra", None)
    mlflow.log_text(yaml.safe_dump(tree, sort_keys=False), "config.yaml")
    existing = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    params = {}
    for key, value in flatten(tree).items():
        value = "" if value is None else str(value)[:MAX_PARAM_CHARS]
        if key in existing and existing[key] != value:
            log.warning("param %s is already logged as %r; not re-logging %r", key, existing[key], value)
        elif key not in existing:
            params[key] = value
    mlflow.log_params(params)


def log_datasets(splits: dict[str, list[dspy.Example]], source: str, name: str) -> None:
    for split, examples in splits.items():
        if not examples:
            continue
        frame = pd.DataFrame([{"question": e.question, "response": e.response,
                               "gold_doc_ids": list(e.get("gold_doc_ids") or [])} for e in examples])
        dataset = mlflow.data.from_pandas(frame, source=source, name=f"{name}-{split}", targets="response")
        mlflow.log_input(dataset, context=split)


def log_evaluation(result: EvalResult, split: str, prefix: str = "") -> dict[str, float]:
    """Metrics and the per-example table, with the same names for every entry point."""
    metrics = {
        f"{prefix}semantic_f1": result.score,
        f"{prefix}failed_examples": result.failed,
        f"{prefix}judge_failures": result.judge_failures,
        f"{prefix}num_examples": result.num_examples,
    }
    recall = mean_recall(result.rows)
    if recall is not None:
        metrics[f"{prefix}recall_at_k"] = 100 * recall
    elif any("retrieved_doc_ids" in r for r in result.rows):
        mlflow.set_tag(f"{prefix}recall_at_k", "not computed: the data has no gold_doc_ids / corpus doc_ids")
    mlflow.log_metrics(metrics)
    log_table(result.rows, f"eval/{prefix}{split}_results.json")
    return metrics


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def count_traces(run_id: str) -> int:
    client, count, token = MlflowClient(), 0, None
    experiment_id = client.get_run(run_id).info.experiment_id
    while True:
        page = client.search_traces(locations=[experiment_id], run_id=run_id, include_spans=False,
                                    max_results=500, page_token=token)
        count += len(page)
        token = page.token
        if not token:
            return count


@contextlib.contextmanager
def watch_traces(expected: int, prefix: str = "") -> Iterator[None]:
    """Check that the traces of the evaluation inside made it to the store, and say why not.

    MLflow drops a trace it cannot write with a log line only; here the count is a metric
    (`traces_logged`) and a shortfall is a warning and a tag naming the export errors.
    `expected` 0 means tracing is off: nothing to check.
    """
    if not expected:
        yield
        return
    failures = _Warnings()
    exporter_log = logging.getLogger("mlflow.tracing.export")
    exporter_log.addHandler(failures)
    run_id = mlflow.active_run().info.run_id
    before = count_traces(run_id)
    try:
        yield
    finally:
        exporter_log.removeHandler(failures)
    logged = count_traces(run_id) - before
    mlflow.log_metric(f"{prefix}traces_logged", logged)
    if logged < expected:
        reasons = "; ".join(dict.fromkeys(m[:300] for m in failures.messages)) or "no export error was reported"
        message = f"{expected - logged} of {expected} traces were not written to the store ({reasons})"
        log.warning(message)
        mlflow.set_tag(f"{prefix}traces_missing", message[:5000])


def log_table(rows: list[dict], artifact_file: str) -> None:
    if rows:
        mlflow.log_table(pd.DataFrame(rows), artifact_file=artifact_file)


def log_usage(lm: dspy.LM, since: int = 0, prefix: str = "") -> None:
    """Prompt/completion tokens and cost of the LM calls recorded after history index `since`."""
    prompt = completion = 0
    cost = 0.0
    for entry in lm.history[since:]:
        usage = entry.get("usage") or {}
        prompt += int(usage.get("prompt_tokens") or 0)
        completion += int(usage.get("completion_tokens") or 0)
        cost += float(entry.get("cost") or 0.0)
    mlflow.log_metrics({f"{prefix}prompt_tokens": prompt, f"{prefix}completion_tokens": completion,
                        f"{prefix}cost_usd": cost})


PROGRAM_SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string", "question")]))


def log_program(program: dspy.Module, lm: dspy.LM, adapter: dspy.Adapter, name: str = "program"):
    """Log the program with `mlflow.dspy.log_model`, with exactly the settings it needs at load time.

    The saved settings are pinned here: a fresh copy of the LM (no call history, no key) and no
    callbacks, so nothing from this process leaks into the pickle.
    """
    with dspy.context(lm=lm.copy(), adapter=adapter, callbacks=[]):
        return mlflow.dspy.log_model(
            program, name=name, code_paths=[str(PROJECT_ROOT / "pipelines")],
            signature=PROGRAM_SIGNATURE, pip_requirements=str(PROJECT_ROOT / "requirements.txt"),
        )


def log_program_json(program: dspy.Module, artifact_path: str = "program") -> None:
    """The learned instructions and demos as DSPy's own JSON (`program.save`)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "program.json"
        program.save(str(path))
        mlflow.log_artifact(str(path), artifact_path)


def register(model_uri: str, registered_model: str, score: float, dev_hash: str, variant: str) -> dict[str, Any]:
    """Register a version, record its dev score, and move `champion` to it only if it is better.

    Scores are compared only when both were measured on the same dev set (by content hash).
    """
    client = MlflowClient()
    version = mlflow.register_model(model_uri, registered_model).version
    tags = {"dev_semantic_f1": f"{score:.4f}", "dev_set": dev_hash, "variant": variant}
    for key, value in tags.items():
        client.set_model_version_tag(registered_model, version, key, value)
    try:
        current = client.get_model_version_by_alias(registered_model, CHAMPION)
    except mlflow.exceptions.MlflowException:
        current = None
    promoted, reason = decide_promotion(current.tags if current else None, score, dev_hash)
    if promoted:
        client.set_registered_model_alias(registered_model, CHAMPION, version)
    if current is not None:
        client.set_model_version_tag(registered_model, version, "champion_dev_semantic_f1_at_registration",
                                     current.tags.get("dev_semantic_f1", "unknown"))
    log.info("Registered %s version %s (dev SemanticF1 %.1f): %s", registered_model, version, score, reason)
    mlflow.set_tags({"registered_model": registered_model, "registered_version": version,
                     "champion": str(promoted).lower(), "promotion": reason})
    return {"version": version, "promoted": promoted, "reason": reason}


def decide_promotion(champion_tags: dict[str, str] | None, score: float, dev_hash: str) -> tuple[bool, str]:
    if champion_tags is None:
        return True, "first registered version becomes champion"
    if champion_tags.get("dev_set") != dev_hash:
        return False, (f"champion was scored on another dev set ({champion_tags.get('dev_set')}); "
                       "not comparable, champion unchanged")
    best = float(champion_tags.get("dev_semantic_f1", "-inf"))
    if score > best:
        return True, f"beats champion ({score:.1f} > {best:.1f})"
    return False, f"does not beat champion ({score:.1f} <= {best:.1f})"


def tag_version_score(model_uri: str, key: str, score: float) -> None:
    """Record a score on the registry version behind a `models:/NAME/VERSION` or `models:/NAME@ALIAS` URI."""
    match = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@(\w+))", model_uri)
    if not match:
        return
    name, version, alias = match.groups()
    client = MlflowClient()
    if alias:
        version = client.get_model_version_by_alias(name, alias).version
    client.set_model_version_tag(name, version, key, f"{score:.4f}")


def log_index(path: Path, build_info: dict[str, Any]) -> None:
    mlflow.log_artifacts(str(path), "index")
    mlflow.log_params({"index.key": path.name})
    mlflow.log_metrics({"index_passages": build_info["passages"], "index_embedded_texts": build_info["embedded"]})
    mlflow.set_tag("index.cache", "hit" if build_info["cache_hit"] else "built")


def log_figure(figure, artifact_file: str) -> None:
    mlflow.log_figure(figure, artifact_file)
