"""The tracking store: point MLflow at it, check a tracking server before any work, create a sqlite
store safely, and turn on DSPy autologging."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import mlflow
from filelock import FileLock

from pipelines.errors import ConfigError
from pipelines.tracking import trace_export
from pipelines.tracking.traces import tag_traces

if TYPE_CHECKING:
    from pipelines.schema import Config, TrackingConfig

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 5  # seconds per request of the tracking server check; no retries
CREDENTIAL_HINT = "MLFLOW_TRACKING_USERNAME=... MLFLOW_TRACKING_PASSWORD=... (or MLFLOW_TRACKING_TOKEN=...)"
GRANT_HINT = "python -m deploy.team_server grant USER --experiment NAME --registered-model NAME --permission EDIT"


def setup(cfg: Config) -> None:
    """Point MLflow at the configured store and experiment and turn on DSPy autologging."""
    # An evaluation's traces wait in memory and are written in bulk with their assessments once it is
    # scored (`trace_export`), so MLflow's async export queue buys nothing, and each flush of it waits up
    # to a second. A user's own setting wins.
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")
    size_connection_pool(max(cfg.num_threads or 1, int(cfg.optimizer.get("num_threads") or 0)))
    uri = store_uri(cfg.tracking)
    mlflow.set_tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        check_server(uri, experiment=cfg.tracking.experiment, registered_model=cfg.tracking.registered_model)
    if cfg.tracking.server and not cfg.tracking.dspy_flavor:
        log.info("Programs go to the shared server without MLflow's dspy flavor, a pickle that runs code when "
                 "loaded: load them with mlflow.pyfunc.load_model or pipelines.tracking.load_program "
                 "(tracking.dspy_flavor=true adds it)")
    init_store(uri)
    if not os.environ.get("MLFLOW_RUN_ID") and not os.environ.get("MLFLOW_EXPERIMENT_ID"):
        name = cfg.tracking.experiment
        local_store = str(cfg.tracking.uri).startswith(("sqlite:", "file:"))
        if local_store and cfg.tracking.artifact_location and mlflow.get_experiment_by_name(name) is None:
            # Artifacts next to the store, not wherever the first run happened to start.
            with contextlib.suppress(mlflow.exceptions.MlflowException):  # created concurrently
                mlflow.create_experiment(name, artifact_location=Path(cfg.tracking.artifact_location).as_uri())
        mlflow.set_experiment(name)
    trace_export.install()
    mlflow.tracing.configure(span_processors=[tag_traces])
    mlflow.dspy.autolog(log_traces=cfg.tracking.log_traces, log_traces_from_eval=True,
                        log_traces_from_compile=False, log_compiles=cfg.tracking.log_compiles,
                        log_evals=cfg.tracking.log_compiles, silent=True)


def store_uri(tracking_cfg: TrackingConfig) -> str:
    """The configured tracking URI; `tracking=server` insists on an http(s) server without credentials
    in the URI (it is logged as a param; credentials belong in MLflow's environment variables)."""
    uri = str(tracking_cfg.uri or "")
    if tracking_cfg.server and not uri.startswith(("http://", "https://")):
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


def check_server(uri: str, *, experiment: str, registered_model: str | None = None) -> None:
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
            raise ConfigError(f"tracking server {where} is unreachable (GET {endpoint}: {short_reason(e)}); start "
                              "it (python -m deploy.team_server) or fix MLFLOW_TRACKING_URI") from None

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


def short_reason(error: BaseException) -> str:
    """What a failed request to the store comes down to, without the URL-laden text of requests/urllib3."""
    text = str(getattr(error, "message", None) or error)
    reasons = {"refused": "connection refused", "timed out": "timed out", "resolve": "unknown host",
               "ssl": "TLS error", "max retries exceeded": "no answer"}
    return next((r for k, r in reasons.items() if k in text.lower()), text.splitlines()[0][:200])


def size_connection_pool(threads: int) -> None:
    """Give every exporting thread the two store connections it may hold at once.

    With synchronous export (MLFLOW_ENABLE_ASYNC_TRACE_LOGGING=false) each evaluation thread exports
    its own traces, and MLflow's `start_trace` holds one pooled connection while it checks out a
    second; with more threads than the pool (5 + 10 overflow by default) they wait on each other
    until the pool's 30 s timeout, and the timed-out traces are dropped. Must run before the store's
    engine exists; a user's own setting wins.
    """
    os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", str(max(5, 2 * threads + 2)))
    os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW", str(max(10, threads)))


def init_store(uri: str) -> None:
    """Create/migrate a sqlite store under a file lock: processes racing on a new store otherwise
    collide in MLflow's schema migration and corrupt it."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.lock"):
        mlflow.search_experiments(max_results=1)
