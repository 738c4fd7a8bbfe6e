"""Everything the project logs to MLflow: runs, params, metrics, tables, datasets, models, traces' tags and
assessments, registry, prompts. (The retriever emits its own span: it travels with the logged model.)"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import dspy
import mlflow
import pandas as pd
import yaml
from mlflow.entities import AssessmentSource, AssessmentSourceType, LoggedModel, LoggedModelStatus
from mlflow.models import ModelSignature
from mlflow.tracing.trace_manager import InMemoryTraceManager
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import Array
from mlflow.utils.mlflow_tags import MLFLOW_RUN_TYPE, MLFLOW_RUN_TYPE_GENAI_EVALUATE

from pipelines import packaging
from pipelines.config import PROJECT_ROOT, ConfigError, flatten, is_secret, to_container
from pipelines.scoring import JUDGED, LABELS, RECALL, EvalResult, Scoring, paired_scores
from pipelines.stats import Comparison, Estimate

log = logging.getLogger(__name__)

CHAMPION = "champion"
MAX_PARAM_CHARS = 6000
DEV_TABLE = "eval/dev_results.json"  # per-example dev scores of the program a run registers
# Set in a Hydra sweep's job (pipelines/sweep.py): JSON with the sweep's run id, the job's name and tags.
SWEEP_JOB_ENV = "RAGQA_SWEEP_JOB"
PROBE_TIMEOUT = 5  # seconds per request of the tracking server check; no retries
CREDENTIAL_HINT = "MLFLOW_TRACKING_USERNAME=... MLFLOW_TRACKING_PASSWORD=... (or MLFLOW_TRACKING_TOKEN=...)"
GRANT_HINT = "python -m deploy.team_server grant USER --experiment NAME --registered-model NAME --permission EDIT"


def setup(cfg) -> None:
    """Point MLflow at the configured store and turn on DSPy autologging."""
    # Traces are exported off the evaluation threads, so an evaluation never waits on the store; the
    # queue holds a whole evaluation, and each evaluation flushes it before counting its traces and
    # adding the metrics to them (`watch_traces`, `log_assessments`).
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "true")
    os.environ.setdefault("MLFLOW_ASYNC_TRACE_LOGGING_MAX_QUEUE_SIZE", "100000")
    if str(cfg.tracking.uri).startswith("sqlite:"):
        # One writer: sqlite takes one at a time anyway, and concurrent exporters burn CPU on lock
        # contention and lose traces to "database is locked".
        os.environ.setdefault("MLFLOW_ASYNC_TRACE_LOGGING_MAX_WORKERS", "1")
    size_connection_pool(max(cfg.num_threads, int(cfg.optimizer.get("num_threads") or 0)))
    uri = store_uri(cfg.tracking)
    mlflow.set_tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        check_server(uri, cfg.tracking.experiment, cfg.tracking.get("registered_model"))
    _init_store(uri)
    if not os.environ.get("MLFLOW_RUN_ID") and not os.environ.get("MLFLOW_EXPERIMENT_ID"):
        name = cfg.tracking.experiment
        local_store = str(cfg.tracking.uri).startswith(("sqlite:", "file:"))
        if local_store and cfg.tracking.get("artifact_location") and mlflow.get_experiment_by_name(name) is None:
            # Artifacts next to the store, not wherever the first run happened to start.
            with contextlib.suppress(mlflow.exceptions.MlflowException):  # created concurrently
                mlflow.create_experiment(name, artifact_location=Path(cfg.tracking.artifact_location).as_uri())
        mlflow.set_experiment(name)
    mlflow.tracing.configure(span_processors=[_tag_trace])
    mlflow.dspy.autolog(log_traces=cfg.tracking.log_traces, log_traces_from_eval=True,
                        log_traces_from_compile=False, log_compiles=cfg.tracking.log_compiles,
                        log_evals=cfg.tracking.log_compiles, silent=True)


def store_uri(tracking_cfg) -> str:
    """The configured tracking URI; `tracking=server` insists on an http(s) server without credentials
    in the URI (it is logged as a param; credentials belong in MLflow's environment variables)."""
    uri = str(tracking_cfg.uri or "")
    if tracking_cfg.get("server") and not uri.startswith(("http://", "https://")):
        raise ConfigError(f"tracking=server needs an http(s) tracking URI, got {public_uri(uri)!r}; "
                          "export MLFLOW_TRACKING_URI=http://HOST:PORT (see deploy/)")
    if urlsplit(uri).password is not None:
        raise ConfigError(f"the tracking URI {public_uri(uri)} carries a password; remove it from the URI and "
                          f"export {CREDENTIAL_HINT}")
    return uri


def public_uri(uri: str) -> str:
    """The URI without any user:password@, fit for messages."""
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])) if parts.netloc else uri


def check_server(uri: str, experiment: str, registered_model: str | None = None) -> None:
    """Fail in seconds, in one line, when the tracking server is down, refuses our credentials or does
    not let us write to the experiment or registered model (MLflow's client would retry for minutes).

    `/health` needs no credentials; an authenticated get-experiment-by-name then tells a wrong
    password (401) or no access (403); on a basic-auth server, a user who is not an admin (whose
    permissions MLflow does not report) is asked for their own permissions there.
    """
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    where = public_uri(uri)
    creds = get_default_host_creds(uri)

    def get(endpoint: str, **params):
        try:
            return http_request(creds, endpoint, "GET", max_retries=0, timeout=PROBE_TIMEOUT, params=params)
        except mlflow.exceptions.MlflowException as e:
            raise ConfigError(f"tracking server {where} is unreachable (GET {endpoint}: {_short(e)}); start it "
                              "(python -m deploy.team_server) or fix MLFLOW_TRACKING_URI") from None

    health = get("/health")
    if health.status_code != 200:
        raise ConfigError(f"{where} does not answer as an MLflow tracking server (GET /health: HTTP "
                          f"{health.status_code}); check MLFLOW_TRACKING_URI")
    found = get("/api/2.0/mlflow/experiments/get-by-name", experiment_name=experiment)
    user = creds.username
    if found.status_code == 401:
        said = f"refused the credentials of {user!r}" if user else "needs credentials"
        raise ConfigError(f"tracking server {where} {said} (HTTP 401); export {CREDENTIAL_HINT}")
    if found.status_code == 403:
        raise ConfigError(f"{user or 'this user'} has no access to experiment {experiment!r} on {where} (HTTP "
                          f"403); ask an admin for EDIT on it ({GRANT_HINT})")
    if found.status_code not in (200, 404):  # 404: the experiment does not exist yet; the first run creates it
        raise ConfigError(f"tracking server {where} answered HTTP {found.status_code} to get-experiment-by-name")
    if not user:
        return
    account = get("/api/2.0/mlflow/users/get", username=user)
    if not account.ok or account.json()["user"]["is_admin"]:  # no basic-auth app, or an admin: may write anywhere
        return
    # Creating a run needs EDIT on the experiment; registering (tags, the champion alias) EDIT on the model.
    resources = [("experiment", experiment, found.json()["experiment"]["experiment_id"])] if found.ok else []
    if registered_model:
        model = get("/api/2.0/mlflow/registered-models/get", name=registered_model)
        if model.status_code in (200, 403):  # 404: it does not exist yet; the first registration creates it
            resources.append(("registered_model", registered_model, registered_model))
    for kind, name, resource_id in resources:
        answer = get("/api/3.0/mlflow/users/permissions/get", username=user, resource_type=kind,
                     resource_id=resource_id)
        permission = answer.json() if answer.ok else {}
        if permission.get("permission") not in ("EDIT", "MANAGE"):
            raise ConfigError(f"{user} may not write to {kind.replace('_', ' ')} {name!r} on {where} (permission "
                              f"{permission.get('permission', f'unknown, HTTP {answer.status_code}')}); ask an "
                              f"admin for EDIT on it ({GRANT_HINT})")


def _short(error: BaseException) -> str:
    """What a failed request to the store comes down to, without the URL-laden text of requests/urllib3."""
    text = str(getattr(error, "message", None) or error)
    reasons = {"refused": "connection refused", "timed out": "timed out", "resolve": "unknown host",
               "ssl": "TLS error", "max retries exceeded": "no answer"}
    return next((r for k, r in reasons.items() if k in text.lower()), text.splitlines()[0][:200])


def size_connection_pool(threads: int) -> None:
    """Give every exporting thread the two store connections it may hold at once.

    With synchronous export (MLFLOW_ENABLE_ASYNC_TRACE_LOGGING=false) each evaluation thread exports
    its own traces, and MLflow's `start_trace` holds one pooled
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
    """Open this step's run: a child of an active run, a sweep job's child of the sweep's run (named
    after the job's swept overrides), the `mlflow run` run, or a new one.

    Whatever happens inside, the run ends in a consistent state: FINISHED, FAILED (with the error
    as a tag), or KILLED on Ctrl-C.
    """
    parent = mlflow.active_run()
    sweep_job = json.loads(os.environ.get(SWEEP_JOB_ENV) or "null")
    if parent is not None:
        active = mlflow.start_run(run_name=name, nested=True)
    elif sweep_job:
        active = mlflow.start_run(run_name=f"{name} {sweep_job['name']}".strip(),
                                  parent_run_id=sweep_job["parent_run_id"], tags=sweep_job["tags"])
    elif os.environ.get("MLFLOW_RUN_ID"):
        active = mlflow.start_run()
        MlflowClient().update_run(active.info.run_id, name=name)  # not the random name `mlflow run` gave it
    else:
        active = mlflow.start_run(run_name=name)
    try:
        mlflow.set_tags({"step": name, "overrides": command_line_overrides(), **(tags or {})})
        log_config(cfg)
        yield active
    except KeyboardInterrupt:
        _fail_pending_models(active.info.run_id)
        _end_run(active, "KILLED")
        raise
    except BaseException as e:
        with contextlib.suppress(Exception):
            mlflow.set_tag("error", f"{type(e).__name__}: {e}"[:5000])
        _fail_pending_models(active.info.run_id)
        _end_run(active, "FAILED", e)
        raise
    else:
        _end_run(active, "FINISHED")


class TrackingServerError(RuntimeError):
    """The tracking server stopped answering during a run; one line for the command line."""


def _end_run(active: mlflow.ActiveRun, status: str, error: BaseException | None = None) -> None:
    """End the run with `status`; if the store no longer answers (a tracking server that went away
    and stayed away through MLflow's retries), say so in one line: what was logged before stays."""
    try:
        mlflow.end_run(status)
    except Exception as e:
        uri = public_uri(mlflow.get_tracking_uri())
        raise TrackingServerError(f"the tracking store {uri} stopped answering during run {active.info.run_id} "
                                  f"({_short(e)}); what was logged before stays there, but the run could not be "
                                  f"marked {status} and shows RUNNING until it is ended by hand") from error


def command_line_overrides() -> str:
    """What the user changed on the command line (Hydra's task overrides), secrets masked, so runs
    can be filtered by it (`tags.overrides LIKE '%k=3%'`)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return ""
    return mask_overrides(HydraConfig.get().overrides.task)


def mask_overrides(overrides) -> str:
    """Hydra overrides as one string, the values of secret-looking keys masked."""
    masked = [f"{o.split('=', 1)[0]}=***" if is_secret(o.split("=", 1)[0].split(".")[-1].lstrip("+~"))
              else o for o in overrides]
    return " ".join(masked)


def _fail_pending_models(run_id: str) -> None:
    """A model whose run failed before its program was logged ends FAILED, not PENDING forever."""
    with contextlib.suppress(Exception):
        client = MlflowClient()
        experiment_id = client.get_run(run_id).info.experiment_id
        for model in client.search_logged_models(experiment_ids=[experiment_id],
                                                 filter_string=f"source_run_id = '{run_id}'"):
            if model.status == LoggedModelStatus.PENDING:
                client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)


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


# Tags for every trace of the evaluation in progress (one at a time per process).
_trace_tags: dict[str, str] = {}


def _tag_trace(span) -> None:
    """Span processor: a root span carries the evaluation's tags into its trace before export."""
    if span.parent_id is None and _trace_tags:
        with InMemoryTraceManager.get_instance().get_trace(span.trace_id) as trace:
            if trace is not None:
                trace.info.tags.update(_trace_tags)


@contextlib.contextmanager
def evaluating(model: LoggedModel | None, **tags: str) -> Iterator[None]:
    """Traces made inside link to `model` (its Traces tab) and carry `tags` (variant, phase, split).

    The run is marked as an evaluation run, as `mlflow.genai.evaluate` marks its own, so the UI lists
    it with its traces and assessments."""
    mlflow.set_tag(MLFLOW_RUN_TYPE, MLFLOW_RUN_TYPE_GENAI_EVALUATE)
    _trace_tags.update(tags)
    try:
        with mlflow.set_active_model(model_id=model.model_id) if model else contextlib.nullcontext():
            yield
    finally:
        _trace_tags.clear()


def new_model(name: str, variant: str, external: bool = False) -> LoggedModel:
    """The LoggedModel of a program version, created before its evaluation so traces and metrics
    link to it; `log_program` then fills it. `external`: a program measured here but logged by
    another run (the baseline inside `optimize`)."""
    create = mlflow.create_external_model if external else mlflow.initialize_logged_model
    return create(name=name, model_type="agent", tags={"variant": variant})


def log_datasets(splits: dict[str, list[dspy.Example]], data_cfg) -> dict[str, Any]:
    """Log each split as a run input; returns the datasets, to link metrics computed on them."""
    source = dataset_source(data_cfg)
    datasets = {}
    for split, examples in splits.items():
        if not examples:
            continue
        frame = pd.DataFrame([{"question": e.question, "response": e.response,
                               "gold_doc_ids": list(e.get("gold_doc_ids") or [])} for e in examples])
        dataset = mlflow.data.from_pandas(frame, source=source, name=f"{data_cfg.name}-{split}", targets="response")
        mlflow.log_input(dataset, context=split)
        datasets[split] = dataset
    return datasets


def dataset_source(data_cfg):
    """Where the examples came from: their download URL, else the local file as a `file://` URI.

    Given a bare path, MLflow finds two identical local-file source types registered (one per URI
    scheme, both of type "local") and warns on every split; offering it only the first leaves
    nothing to guess.
    """
    from mlflow.data.dataset_source_registry import get_registered_sources, resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    if data_cfg.examples_url:
        return HTTPDatasetSource(data_cfg.examples_url)
    uri = Path(data_cfg.examples).resolve().as_uri()
    local = [s for s in get_registered_sources() if s._get_source_type() == "local" and s._can_resolve(uri)]
    return resolve_dataset_source(uri, candidate_sources=local[:1])


def run_name() -> str:
    return mlflow.active_run().info.run_name


def set_tags(tags: dict[str, str]) -> None:
    mlflow.set_tags(tags)


def log_text(text: str, artifact_file: str) -> None:
    mlflow.log_text(text, artifact_file)


def log_metrics(metrics: dict[str, float], model: LoggedModel | None = None, dataset=None) -> None:
    """Metrics of the active run, linked to the model they measure and the dataset they were computed on.

    A model still PENDING is logged by this run: `log_model` then links the run's metrics to it itself
    (and fails on metrics already linked). Others (external, or logged earlier) are linked here.
    """
    linked = model if model is not None and model.status != LoggedModelStatus.PENDING else None
    mlflow.log_metrics(metrics, model_id=linked.model_id if linked else None, dataset=dataset)


def estimate_metrics(estimates: dict[str, Estimate], prefix: str = "") -> dict[str, float]:
    """`{prefix}{metric}` with `_ci_low` and `_ci_high` beside it when there is an interval."""
    metrics = {}
    for name, estimate in estimates.items():
        metrics[f"{prefix}{name}"] = estimate.value
        if estimate.half_width is not None:
            metrics[f"{prefix}{name}_ci_low"] = estimate.low
            metrics[f"{prefix}{name}_ci_high"] = estimate.high
    return metrics


def comparison_metrics(comparisons: dict[str, Comparison], prefix: str = "") -> dict[str, float]:
    """`{prefix}{metric}_delta` with its `_ci_low`, `_ci_high` and `_p_value`."""
    metrics = {}
    for name, comparison in comparisons.items():
        metrics.update(estimate_metrics({f"{name}_delta": comparison.delta}, prefix))
        if comparison.p_value is not None:
            metrics[f"{prefix}{name}_delta_p_value"] = comparison.p_value
    return metrics


def log_evaluation(result: EvalResult, split: str, prefix: str = "", model: LoggedModel | None = None,
                   dataset=None) -> dict[str, float]:
    """Metrics with intervals (linked to the evaluated model and dataset), the per-example table and
    trace assessments, named alike for every entry point."""
    metrics = {
        **estimate_metrics(result.estimates, prefix),
        f"{prefix}failed_examples": result.failed,
        f"{prefix}judge_failures": result.judge_failures,
        f"{prefix}num_examples": result.num_examples,
    }
    missing = [e.no_interval_reason for e in result.estimates.values() if e.no_interval_reason]
    if missing:
        log.warning("%s%s scores have %s", prefix, split, missing[0])
        mlflow.set_tag(f"{prefix}confidence_intervals", f"not computed: {missing[0]}")
    if RECALL not in result.estimates and any("retrieved_doc_ids" in r for r in result.rows):
        mlflow.set_tag(f"{prefix}recall_at_k", "not computed: the data has no gold_doc_ids / corpus doc_ids")
    log_metrics(metrics, model, dataset)
    log_table(result.rows, f"eval/{prefix}{split}_results.json")
    log_assessments(result)
    return metrics


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def count_traces(run_id: str, client: MlflowClient | None = None) -> int:
    """Traces logged in a run (through `client`'s store, else the current one)."""
    client, count, token = client or MlflowClient(), 0, None
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
        mlflow.flush_trace_async_logging()
    finally:
        exporter_log.removeHandler(failures)
    logged = count_traces(run_id) - before
    mlflow.log_metric(f"{prefix}traces_logged", logged)
    if logged < expected:
        reasons = "; ".join(dict.fromkeys(m[:300] for m in failures.messages)) or "no export error was reported"
        message = f"{expected - logged} of {expected} traces were not written to the store ({reasons})"
        log.warning(message)
        mlflow.set_tag(f"{prefix}traces_missing", message[:5000])


def last_trace_id() -> str | None:
    """The trace this thread finished last: inside a `dspy.Evaluate` metric, the example's program call."""
    return mlflow.get_last_active_trace_id(thread_local=True)


def log_assessments(result: EvalResult) -> None:
    """Every metric of every traced example as one feedback on its trace (0-100), to sort and filter by."""
    if not any(row.get("trace_id") for row in result.rows):
        return
    mlflow.flush_trace_async_logging()  # with async export a trace may not be stored yet
    judge = AssessmentSource(source_type=AssessmentSourceType.LLM_JUDGE, source_id=result.judge or "judge")
    for row in result.rows:
        if not row.get("trace_id"):
            continue
        for name in result.estimates:
            if row.get(name) is None:
                continue
            source = judge if name == JUDGED else AssessmentSource(source_type=AssessmentSourceType.CODE,
                                                                   source_id=f"pipelines.scoring.{name}")
            mlflow.log_feedback(trace_id=row["trace_id"], name=name, value=row[name], source=source,
                                rationale=row.get(f"{name}_rationale") or row.get("error") or None)


def log_table(rows: list[dict], artifact_file: str) -> None:
    if rows:
        mlflow.log_table(pd.DataFrame(rows), artifact_file=artifact_file)


@contextlib.contextmanager
def usage(lm: dspy.LM, **others: dspy.LM | None) -> Iterator[None]:
    """Log tokens and cost of the calls made inside the block, also when it fails: `lm`'s as
    `prompt_tokens`, `completion_tokens`, `cost_usd`; each other distinct LM's with its name as prefix
    (`judge_prompt_tokens`). An LM that is `lm` itself, or None, is skipped."""
    lms = {"": lm}
    for name, other in others.items():
        if other is not None and all(other is not seen for seen in lms.values()):
            lms[f"{name}_"] = other
    # The last entry, not an index: DSPy trims each LM's history at settings.max_history_size.
    marks = {prefix: (model.history[-1] if model.history else None) for prefix, model in lms.items()}
    try:
        yield
    finally:
        metrics = {}
        for prefix, model in lms.items():
            metrics.update(_usage_metrics(_calls_after(model.history, marks[prefix]), prefix))
        mlflow.log_metrics(metrics)


def _calls_after(history: list[dict], mark: dict | None) -> list[dict]:
    for i in range(len(history) - 1, -1, -1):
        if history[i] is mark:
            return history[i + 1:]
    if mark is not None:
        log.warning("LM history was trimmed during the run (dspy max_history_size=%d): token counts "
                    "cover the last %d calls only", dspy.settings.max_history_size, len(history))
    return history


def _usage_metrics(calls: list[dict], prefix: str) -> dict[str, float]:
    prompt = completion = 0
    cost = 0.0
    for entry in calls:
        counts = entry.get("usage") or {}
        prompt += int(counts.get("prompt_tokens") or 0)
        completion += int(counts.get("completion_tokens") or 0)
        cost += float(entry.get("cost") or 0.0)
    return {f"{prefix}prompt_tokens": prompt, f"{prefix}completion_tokens": completion, f"{prefix}cost_usd": cost}


def program_signature(retrieves: bool, doc_id_type: str = "long") -> ModelSignature:
    """A question in; the answer, its reasoning, and for RAG the passages and their doc ids out."""
    outputs = [ColSpec("string", "reasoning"), ColSpec("string", "response")]
    if retrieves:
        outputs += [ColSpec(Array("string"), "context"), ColSpec(Array(doc_id_type), "doc_ids")]
    return ModelSignature(inputs=Schema([ColSpec("string", "question")]), outputs=Schema(outputs))


def log_program(program: dspy.Module, lm: dspy.LM, adapter: dspy.Adapter, model: LoggedModel,
                signature: ModelSignature, prompts: list | None = None):
    """Log the program into `model` as MLflow "models from code": `pipelines/model_code.py` rebuilds it
    from plain files (`pipelines/packaging.py`: its spec, DSPy's JSON state, the RAG index), so loading
    or serving it unpickles nothing. The LM's settings travel with it, never its key. `prompts`
    (registered prompt versions) are linked to the logged model.
    """
    with tempfile.TemporaryDirectory() as tmp:
        files = Path(tmp) / "program"
        packaging.save(program, lm, adapter, files)
        return mlflow.pyfunc.log_model(
            name=model.name, model_id=model.model_id, python_model=str(PROJECT_ROOT / "pipelines" / "model_code.py"),
            artifacts={"program": str(files)}, code_paths=[str(PROJECT_ROOT / "pipelines")], signature=signature,
            pip_requirements=str(PROJECT_ROOT / "requirements.txt"), prompts=prompts or None,
        )


def log_program_json(program: dspy.Module, artifact_path: str = "program") -> None:
    """The learned instructions and demos as DSPy's own JSON (`program.save`)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "program.json"
        program.save(str(path))
        mlflow.log_artifact(str(path), artifact_path)


def register(model_uri: str, registered_model: str, result: EvalResult, dev_hash: str, variant: str,
             scoring: Scoring) -> dict[str, Any]:
    """Register a version, record its dev scores, and move `champion` to it if `scoring.promotion` says so.

    Versions are compared only when both were scored on the same dev set (by content hash); the
    champion's per-example scores come from its run's `eval/dev_results.json`, paired by question.
    """
    client = MlflowClient()
    version = mlflow.register_model(model_uri, registered_model).version
    tags = {**score_tags(estimate_metrics(result.estimates, "dev_")), "dev_set": dev_hash, "variant": variant,
            "primary_metric": scoring.primary}
    tag_version(registered_model, version, tags)  # before any alias points here: a champion always has scores
    try:
        current = client.get_model_version_by_alias(registered_model, CHAMPION)
    except mlflow.exceptions.MlflowException:
        current = None
    champion_rows = None
    if current is not None and current.tags.get("dev_set") == dev_hash:
        champion_rows = load_table(current.run_id, DEV_TABLE)
    decision = decide_promotion(current.tags if current else None, result, dev_hash, scoring, champion_rows)
    if decision.promoted:
        client.set_registered_model_alias(registered_model, CHAMPION, version)
    tags = {"promotion_rule": scoring.promotion, "promotion": decision.reason}
    if current is not None:
        key = f"dev_{scoring.primary}"
        tags.update({"champion_version_at_registration": str(current.version),
                     f"champion_{key}_at_registration": current.tags.get(key, "unknown")})
    if decision.comparison is not None:
        tags.update(score_tags(comparison_metrics({f"dev_{scoring.primary}": decision.comparison}, "vs_champion_")))
    tag_version(registered_model, version, tags)
    log.info("Registered %s version %s (dev %s): %s", registered_model, version, result.headline(), decision.reason)
    # Which version is champion now is the registry's alias, not a run tag that would go stale.
    mlflow.set_tags({"registered_model": registered_model, "registered_version": version,
                     "promotion_at_registration": decision.reason})
    return {"version": version, "promoted": decision.promoted, "reason": decision.reason}


@dataclass(frozen=True)
class Promotion:
    promoted: bool
    reason: str
    comparison: Comparison | None = None  # new - champion on the primary metric, when they pair


def decide_promotion(champion_tags: dict[str, str] | None, result: EvalResult, dev_hash: str, scoring: Scoring,
                     champion_rows: list[dict] | None = None) -> Promotion:
    if champion_tags is None:
        return Promotion(True, "first registered version becomes champion")
    if champion_tags.get("dev_set") != dev_hash:
        return Promotion(False, f"champion was scored on another dev set ({champion_tags.get('dev_set')}); "
                                "not comparable, champion unchanged")
    metric, label = scoring.primary, LABELS[scoring.primary]
    comparison = None
    if champion_rows is not None:
        new, old = paired_scores(result.rows, champion_rows, metric)
        comparison = scoring.paired(new, old) if new else None
    if scoring.promotion == "better":
        best = champion_tags.get(f"dev_{metric}")
        if best is None:
            return Promotion(False, f"champion has no dev {label} score; not comparable, champion unchanged",
                             comparison)
        if result.score > float(best):
            return Promotion(True, f"beats champion on {label} ({result.score:.1f} > {float(best):.1f})", comparison)
        return Promotion(False, f"does not beat champion on {label} ({result.score:.1f} <= {float(best):.1f})",
                         comparison)
    if comparison is None:
        return Promotion(False, f"cannot pair with the champion's per-example {label} scores (its {DEV_TABLE} is "
                                "missing or has no such column); champion unchanged")
    if comparison.p_value is None:
        return Promotion(False, f"{label} {comparison.describe()}: too few paired examples; champion unchanged",
                         comparison)
    if comparison.above_zero:
        return Promotion(True, f"beats champion beyond noise: {label} {comparison.describe()}", comparison)
    return Promotion(False, f"not better than champion beyond noise: {label} {comparison.describe()}; "
                            "champion unchanged", comparison)


def score_tags(metrics: dict[str, float]) -> dict[str, str]:
    return {key: f"{value:.4f}" for key, value in metrics.items()}


def tag_version(registered_model: str, version: str, tags: dict[str, str]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(registered_model, version, key, value)


def load_table(run_id: str, artifact_file: str) -> list[dict] | None:
    """Rows of a table logged with `log_table`, or None if the run has no such artifact."""
    try:
        table = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{artifact_file}"))
    except (mlflow.exceptions.MlflowException, OSError, ValueError):
        return None
    return [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]


def tag_version_scores(model_uri: str, metrics: dict[str, float]) -> None:
    """Record scores on the registry version behind a `models:/NAME/VERSION` or `models:/NAME@ALIAS` URI."""
    match = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@(\w+))", model_uri)
    if not match:
        return
    name, version, alias = match.groups()
    if alias:
        version = MlflowClient().get_model_version_by_alias(name, alias).version
    tag_version(name, version, score_tags(metrics))


def load_program(model_uri: str) -> dspy.Module:
    """Load a logged program and, as `mlflow.dspy.load_model` does, configure DSPy with its LM and adapter.

    Programs are rebuilt from their files. One pickled by an older version of this project
    (`mlflow.dspy.log_model`) runs code from the pickle as it loads, so it loads only when the user
    has set MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true: MLflow 3.17 treats the unset variable as true, and
    that is no one's decision.
    """
    from mlflow.environment_variables import MLFLOW_ALLOW_PICKLE_DESERIALIZATION as ALLOW_PICKLE
    from mlflow.models import get_model_info

    try:
        pickled = "dspy" in get_model_info(model_uri).flavors
        if pickled and not (ALLOW_PICKLE.is_set() and ALLOW_PICKLE.get()):
            raise ConfigError(f"{model_uri} is a pickled program from an older version of this project, and "
                              "unpickling can run arbitrary code: if you trust it, set "
                              "MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true to load it, or re-run the step that logged it")
        if pickled:
            return mlflow.dspy.load_model(model_uri)
        model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    except mlflow.exceptions.MlflowException as e:
        raise ConfigError(f"cannot load {model_uri}: {e.message.splitlines()[0]}") from None
    except (ModuleNotFoundError, AttributeError, ImportError) as e:
        raise ConfigError(f"{model_uri} was logged by an incompatible version of this project "
                          f"({type(e).__name__}: {e}); re-run the step that logged it") from None
    dspy.configure(lm=model.lm, adapter=model.adapter)
    return model.program


def logged_model_of(model_uri: str) -> LoggedModel | None:
    """The LoggedModel behind a `models:/` or `runs:/` URI, so an evaluation links to it."""
    from mlflow.models import get_model_info

    model_id = get_model_info(model_uri).model_id
    return mlflow.get_logged_model(model_id) if model_id else None


def log_optimizer_trials(program: dspy.Module) -> None:
    """MIPROv2's trial scores as step metrics (steps = trial numbers), and the best one."""
    trials = getattr(program, "trial_logs", None) or {}
    for trial, entry in sorted(trials.items()):
        if entry.get("full_eval_score") is not None:
            mlflow.log_metric("mipro_trial_score", float(entry["full_eval_score"]), step=int(trial))
        if entry.get("mb_score") is not None:
            mlflow.log_metric("mipro_minibatch_score", float(entry["mb_score"]), step=int(trial))
    if getattr(program, "score", None) is not None:
        mlflow.log_metric("mipro_best_score", float(program.score))


def log_index(path: Path, build_info: dict[str, Any]) -> None:
    mlflow.log_artifacts(str(path), "index")
    mlflow.log_params({"index.key": path.name})
    mlflow.log_metrics({"index_passages": build_info["passages"], "index_embedded_texts": build_info["embedded"]})
    mlflow.set_tag("index.cache", "hit" if build_info["cache_hit"] else "built")


def log_figure(figure, artifact_file: str) -> None:
    mlflow.log_figure(figure, artifact_file)


# ---------------------------------------------------------------------------------------------
# Learned prompts in MLflow's prompt registry


def prompt_name(registered_model: str, predictor: str) -> str:
    """`<registered model>.<predictor>`, with characters MLflow's prompt names refuse made `-`."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{registered_model}.{predictor}")


def plain_text(text: str) -> str:
    """Text that MLflow will not read as a template: `{{ x }}` would become a variable, `{% %}` Jinja."""
    return str(text).replace("{{", "{ {").replace("{%", "{ %")


def prompt_messages(predictor: dspy.Predict) -> list[dict[str, str]]:
    """The predictor as chat messages: its instructions as the system message, each demo as a user
    turn (its input fields) and an assistant turn (its output fields), as DSPy's adapters send them."""
    signature = predictor.signature
    messages = [{"role": "system", "content": signature.instructions}]
    for demo in predictor.demos:
        messages += [{"role": "user", "content": _demo_fields(demo, signature.input_fields)},
                     {"role": "assistant", "content": _demo_fields(demo, signature.output_fields)}]
    return messages


def _demo_fields(demo, names) -> str:
    def text(value) -> str:
        return "\n".join(map(str, value)) if isinstance(value, list) else str(value)

    return "\n\n".join(f"{name}: {text(demo[name])}" for name in names if demo.get(name) is not None)


def register_prompts(program: dspy.Module, registered_model: str, variant: str) -> list:
    """One new prompt version per predictor of `program`, tagged with the run that learned it."""
    run_id = mlflow.active_run().info.run_id
    versions = []
    for predictor_name, predictor in program.named_predictors():
        messages = prompt_messages(predictor)
        template = [{**m, "content": plain_text(m["content"])} for m in messages]
        versions.append(mlflow.genai.register_prompt(
            name=prompt_name(registered_model, predictor_name), template=template,
            commit_message=f"{variant}: instructions and {len(predictor.demos)} demos of {predictor_name}",
            tags={"registered_model": registered_model, "predictor": predictor_name, "variant": variant,
                  "run_id": run_id, "demos": str(len(predictor.demos)),
                  "braces_escaped": str(template != messages).lower()}))
    return versions


def link_prompts(prompts: list, registered_model: str, version: str, promoted: bool) -> None:
    """Tag each prompt version with its model version; when that became champion, move the prompts'
    `champion` alias to these versions and off this model's prompts that the new champion lacks."""
    for prompt in prompts:
        mlflow.genai.set_prompt_version_tag(prompt.name, prompt.version, "model_version", str(version))
    mlflow.set_tag("prompts", ", ".join(f"{p.name}/{p.version}" for p in prompts))
    if not promoted:
        return
    current = {p.name for p in prompts}
    prefix = prompt_name(registered_model, "")
    for other in mlflow.genai.search_prompts(filter_string=f"name LIKE '{prefix}%'"):
        if other.name.startswith(prefix) and other.name not in current:
            mlflow.genai.delete_prompt_alias(other.name, CHAMPION)
    for prompt in prompts:
        mlflow.genai.set_prompt_alias(prompt.name, CHAMPION, prompt.version)


class GEPAProgress:
    """GEPA callback (`gepa_kwargs={"callbacks": [...]}`) that logs its progress as step metrics.

    Step 0 is the seed program, then one step per iteration: metric calls spent (`gepa_metric_calls`),
    the best score on its validation set so far (`gepa_best_val_score`, 0-100 like `semantic_f1`),
    candidates kept (`gepa_candidates`), proposals made (`gepa_proposals`) and reflections that gave
    no usable instruction (`gepa_unusable_proposals`: unparseable or empty; GEPA skips those).
    """

    def __init__(self):
        self.run_id: str | None = None
        self.reflections = 0
        self.proposals = 0
        self._unusable_logged = 0

    @property
    def unusable(self) -> int:
        return self.reflections - self.proposals

    def on_optimization_start(self, event) -> None:
        self.run_id = mlflow.active_run().info.run_id  # the optimize run; eval child runs come and go

    def on_valset_evaluated(self, event) -> None:
        if event["iteration"] == 0:
            mlflow.log_metrics({"gepa_best_val_score": 100 * event["average_score"],
                                "gepa_metric_calls": event["num_examples_evaluated"]}, step=0, run_id=self.run_id)

    def on_proposal_start(self, event) -> None:
        self.reflections += 1

    def on_proposal_end(self, event) -> None:
        self.proposals += 1

    def on_iteration_end(self, event) -> None:
        state = event["state"]
        if self.unusable > self._unusable_logged:
            log.warning("GEPA iteration %d: the reflection LM gave no usable instruction (%d so far); "
                        "GEPA keeps its best candidate and goes on", event["iteration"], self.unusable)
            self._unusable_logged = self.unusable
        mlflow.log_metrics({"gepa_metric_calls": state.total_num_evals,
                            "gepa_best_val_score": 100 * max(state.program_full_scores_val_set),
                            "gepa_candidates": len(state.program_candidates) - 1,
                            "gepa_proposals": self.proposals, "gepa_unusable_proposals": self.unusable},
                           step=event["iteration"], run_id=self.run_id)
