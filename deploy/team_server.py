"""A team MLflow server to try on one machine: PostgreSQL (the `pgserver` package, on a Unix socket) as
the store, a local directory as the proxied artifact store, MLflow's basic-auth app in front.

    export MLFLOW_AUTH_ADMIN_PASSWORD=...             # at least 12 characters; only read on first start
    python -m deploy.team_server serve --port 5000    # Ctrl-C stops MLflow, then PostgreSQL

    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000 MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=...
    TEAM_SERVER_USER_PASSWORD=... python -m deploy.team_server add-user alice
    python -m deploy.team_server grant alice --experiment ragqa-arena-tech --registered-model ragqa-tech-sample \\
        --permission EDIT

For a real deployment use deploy/compose.yaml. Passwords are read from the environment (or prompted
for), never from the command line, and are written nowhere but MLflow's auth tables (hashed).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mlflow.exceptions import MlflowException

from pipelines.config import PROJECT_ROOT

NEW_USER_PASSWORD = "TEAM_SERVER_USER_PASSWORD"
GRANTS = ("READ", "USE", "EDIT", "MANAGE", "DENY")  # what a grant on one resource may say
DEFAULTS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS")


def default_data_dir() -> Path:
    return Path(os.environ.get("RAGQA_CACHE_DIR", PROJECT_ROOT / ".cache")) / "team-server"


def start_postgres(data_dir: Path):
    """PostgreSQL in `data_dir/pg` (created on first use), trusting local connections on its Unix
    socket only; returns the pgserver handle and a SQLAlchemy URI per database."""
    import pgserver

    data_dir.mkdir(parents=True, exist_ok=True)
    postgres = pgserver.get_server(data_dir / "pg", cleanup_mode="stop")
    existing = {line.strip() for line in postgres.psql("SELECT datname FROM pg_database;").splitlines()}
    for database in ("mlflow", "mlflow_auth"):  # runs and registry; users and permissions
        if database not in existing:
            postgres.psql(f"CREATE DATABASE {database};")
    # psycopg2 named explicitly: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, not installed here.
    return postgres, {name: postgres.get_uri(name).replace("postgresql://", "postgresql+psycopg2://", 1)
                      for name in ("mlflow", "mlflow_auth")}


def write_auth_config(database_uri: str, default_permission: str) -> Path:
    """basic-auth's ini in a private file (mode 0600). The admin password is not in it: MLflow reads
    MLFLOW_AUTH_ADMIN_PASSWORD from the environment when it creates the admin on first start."""
    fd, path = tempfile.mkstemp(prefix="mlflow-auth-", suffix=".ini")
    with os.fdopen(fd, "w") as ini:
        ini.write("[mlflow]\n"
                  f"default_permission = {default_permission}\n"
                  f"database_uri = {database_uri}\n"
                  f"admin_username = {os.environ.get('MLFLOW_AUTH_ADMIN_USERNAME', 'admin')}\n"
                  "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                  # A run makes hundreds of requests, each a PBKDF2 password check without the cache
                  # (seconds of CPU per run); the price: another worker may accept a changed password
                  # for up to 60 s.
                  "auth_cache_ttl_seconds = 60\n")
    return Path(path)


def wait_healthy(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"error: mlflow server exited with code {process.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"error: mlflow server at {url} was not healthy after {timeout:.0f} s")


def serve(args) -> None:
    if not os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD") and not (args.data_dir / "pg").exists():
        raise SystemExit("error: export MLFLOW_AUTH_ADMIN_PASSWORD=... (at least 12 characters) for the admin "
                         "user MLflow creates on first start")
    postgres, uris = start_postgres(args.data_dir)
    auth_ini = write_auth_config(uris["mlflow_auth"], args.default_permission)
    url = f"http://{args.host}:{args.port}"
    # LiteLLM, imported by the server, would otherwise try to download its price list (a stall offline).
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    # The workers share one CSRF key; a new one per start only logs browsers out of the UI.
    env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
    # No job runner (jobs started from the UI): runs only need tracking, and the runner's processes
    # cost CPU and held up shutdown past 20 s.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uris["mlflow"],
               "--artifacts-destination", str(args.data_dir / "artifacts"), "--app-name", "basic-auth",
               "--host", args.host, "--port", str(args.port), "--workers", str(args.workers)]
    # Its own process group, so stopping reaches the uvicorn workers it spawns.
    server = subprocess.Popen(command, env=env, start_new_session=True)

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        wait_healthy(url, server, args.timeout)
        user = os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME", "admin")
        print(f"MLflow team server at {url} (store: PostgreSQL in {args.data_dir / 'pg'}, artifacts: "
              f"{args.data_dir / 'artifacts'}). Point runs at it with:\n"
              f"  export MLFLOW_TRACKING_URI={url} MLFLOW_TRACKING_USERNAME={user} MLFLOW_TRACKING_PASSWORD=...\n"
              "Ctrl-C stops it.", flush=True)
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        auth_ini.unlink(missing_ok=True)
        postgres.cleanup()
        print("stopped", flush=True)


def auth_client(uri: str | None):
    from mlflow.server import get_app_client

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise SystemExit("error: give --uri or export MLFLOW_TRACKING_URI")
    return uri, get_app_client("basic-auth", tracking_uri=uri)


def new_password(username: str) -> str:
    password = os.environ.get(NEW_USER_PASSWORD)
    if password:
        return password
    password = getpass.getpass(f"password for {username} (at least 12 characters): ")
    if password != getpass.getpass("again: "):
        raise SystemExit("error: the passwords differ")
    return password


def grant(args, uri: str, client) -> None:
    """Experiment permissions go by id, registered models by name; a new grant replaces an old one."""
    from mlflow import MlflowClient

    if (args.experiment or args.registered_model) and not args.permission:
        raise SystemExit("error: --experiment/--registered-model need --permission")
    resources = []
    if args.experiment:
        experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(args.experiment)
        if experiment is None:
            raise SystemExit(f"error: no experiment {args.experiment!r} on {uri}; a first run creates it")
        resources.append(("experiment", experiment.experiment_id, args.experiment))
    if args.registered_model:
        resources.append(("registered_model", args.registered_model, args.registered_model))
    for kind, resource_id, name in resources:
        if client.get_user_permission(args.username, kind, resource_id).permission != args.permission:
            with contextlib.suppress(MlflowException):  # nothing granted yet
                client.revoke_user_permission(args.username, kind, resource_id)
            client.grant_user_permission(args.username, kind, resource_id, args.permission)
        print(f"{args.username}: {args.permission} on {kind.replace('_', ' ')} {name}")


def add_user(args) -> None:
    uri, client = auth_client(args.uri)
    client.create_user(args.username, new_password(args.username))
    print(f"created user {args.username}")
    grant(args, uri, client)


def grant_only(args) -> None:
    uri, client = auth_client(args.uri)
    grant(args, uri, client)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.team_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="start PostgreSQL and mlflow server --app-name basic-auth")
    run.add_argument("--data-dir", type=Path, default=default_data_dir(),
                     help="PostgreSQL data and artifacts (default: %(default)s)")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=5000)
    run.add_argument("--workers", type=int, default=2)
    run.add_argument("--default-permission", choices=DEFAULTS, default="READ",
                     help="what users have on resources nobody granted them (default: %(default)s)")
    run.add_argument("--timeout", type=float, default=180, help="seconds to wait for the server to be healthy")
    run.set_defaults(func=serve)
    for name, func, text in (("add-user", add_user, f"create a user (password from ${NEW_USER_PASSWORD} or "
                                                    "a prompt) and optionally grant permissions"),
                             ("grant", grant_only, "grant a user a permission on an experiment / registered model")):
        sub = commands.add_parser(name, help=text + "; as an admin (MLFLOW_TRACKING_USERNAME/PASSWORD)")
        sub.add_argument("username")
        sub.add_argument("--uri", help="tracking server (default: $MLFLOW_TRACKING_URI)")
        sub.add_argument("--experiment", help="experiment name")
        sub.add_argument("--registered-model", help="registered model name")
        sub.add_argument("--permission", choices=GRANTS)
        sub.set_defaults(func=func)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except MlflowException as e:
        raise SystemExit(f"error: {e.message.splitlines()[0]}") from None


if __name__ == "__main__":
    main()
