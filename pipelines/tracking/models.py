"""Programs as MLflow models: a LoggedModel per program version, logged with the project's flavor
(`pipelines/flavor.py`), and loaded back as the `dspy.Module` it was."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import dspy
import mlflow
import pandas as pd
from mlflow.entities import LoggedModel, LoggedModelStatus
from mlflow.entities.model_registry import PromptVersion
from mlflow.models import Model, ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array

from pipelines import flavor, packaging
from pipelines.config import PROJECT_ROOT
from pipelines.errors import ConfigError
from pipelines.programs import inputs, outputs

# What a request to a served program looks like, shown with the model in the UI; answering it at log
# time would be an LM call per logged version, so MLflow's check of it is off.
EXAMPLE = "How do I undo my last git commit but keep its changes?"


def new_model(name: str, *, variant: str, external: bool = False, tags: dict[str, str] | None = None) -> LoggedModel:
    """The LoggedModel of a program version, created before its evaluation so traces and metrics
    link to it; `log_program` then fills it. `external`: a program measured here but logged by
    another run (the baseline inside `optimize`); `tags`: its lineage (teacher, adapter)."""
    create = mlflow.create_external_model if external else mlflow.initialize_logged_model
    return create(name=name, model_type="agent", tags={"variant": variant, **(tags or {})})


def program_signature(program: dspy.Module, *, doc_id_type: str = "long", num_threads: int = 1) -> ModelSignature:
    """Questions in (with the program's other input fields, if any); per question what the program answers
    with (`pipelines.programs.outputs`: the answer, its reasoning, a RAG's passages and their doc ids, ...),
    the row's error ("" when it answered) and its trace id ("" when untraced), to attach feedback to.
    `num_threads`: rows answered at once, unless a call says."""
    types = {"doc_ids": Array(doc_id_type), "context": Array("string"), "queries": Array("string"),
             "candidates": Array("string")}
    columns = [ColSpec(types.get(name, "string"), name) for name in outputs(program)]
    return ModelSignature(inputs=Schema([ColSpec("string", name) for name in inputs(program)]),
                          outputs=Schema([*columns, ColSpec("string", packaging.ERROR),
                                          ColSpec("string", packaging.TRACE_ID)]),
                          params=ParamSchema([ParamSpec("num_threads", "long", num_threads)]))


def log_program(program: dspy.Module, *, lm: dspy.LM, adapter: dspy.Adapter, model: LoggedModel,
                signature: ModelSignature, dspy_flavor: bool,
                prompts: list[PromptVersion] | None = None) -> ModelInfo:
    """Log the program into `model` with the project's flavor (`pipelines/flavor.py`): pyfunc from code
    and plain files, which loads and serves without unpickling anything, and, with `dspy_flavor`,
    MLflow's own `dspy` flavor for `mlflow.dspy.load_model`. The LM's settings travel with it, never
    its key. `prompts` (registered prompt versions) are linked to the logged model.
    """
    return Model.log(artifact_path=None, name=model.name, model_id=model.model_id, flavor=flavor,
                     flavor_name="dspy" if dspy_flavor else "python_function", prompts=prompts or None,
                     program=program, lm=lm, adapter=adapter, signature=signature, dspy_flavor=dspy_flavor,
                     input_example=pd.DataFrame({name: [EXAMPLE if name == "question" else f"your {name}"]
                                                 for name in signature.inputs.input_names()}),
                     validate_serving_input=False,
                     pip_requirements=str(PROJECT_ROOT / "requirements.txt"))


def check_model(model_uri: str) -> ModelInfo:
    """The model behind `model_uri`, or a one-line error saying why there is none."""
    from mlflow.models import get_model_info

    try:
        return get_model_info(model_uri)
    except mlflow.exceptions.MlflowException as e:
        raise ConfigError(f"cannot load {model_uri}: {e.message.splitlines()[0]}") from None


def load_program(model_uri: str) -> dspy.Module:
    """Load a logged program and, as `mlflow.dspy.load_model` does, configure DSPy with its LM and adapter.

    The program is rebuilt from its files through the pyfunc flavor: no pickle is read. A version
    logged by an older version of this project as a pickle only (`mlflow.dspy.log_model`) runs code
    from the pickle as it loads, so it loads only when the user has set
    MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true: MLflow 3.17 treats the unset variable as true, and that
    is no one's decision.
    """
    from mlflow.environment_variables import MLFLOW_ALLOW_PICKLE_DESERIALIZATION as ALLOW_PICKLE

    pyfunc = check_model(model_uri).flavors.get("python_function", {})
    pickled = pyfunc.get("loader_module") == "mlflow.dspy"
    if pickled and not (ALLOW_PICKLE.is_set() and ALLOW_PICKLE.get()):
        raise ConfigError(f"{model_uri} is a pickled program from an older version of this project, and "
                          "unpickling can run arbitrary code: if you trust it, set "
                          "MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true to load it, or re-run the step that logged it")
    if pickled:
        with _load_errors(model_uri):
            return mlflow.dspy.load_model(model_uri)
    packaged = load_packaged(model_uri)
    dspy.configure(lm=packaged.lm, adapter=packaged.adapter)
    return packaged.program


def load_packaged(model_uri: str) -> packaging.Packaged:
    """A program of this project with the LM and adapter it answers through, rebuilt from its plain files
    (no pickle read, DSPy's settings untouched)."""
    check_program_model(model_uri)
    with _load_errors(model_uri):
        model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    return packaging.Packaged(program=model.program, lm=model.lm, adapter=model.adapter)


@contextlib.contextmanager
def _load_errors(model_uri: str) -> Iterator[None]:
    try:
        yield
    except mlflow.exceptions.MlflowException as e:
        raise ConfigError(f"cannot load {model_uri}: {e.message.splitlines()[0]}") from None
    except (ModuleNotFoundError, AttributeError, ImportError) as e:
        raise ConfigError(f"{model_uri} was logged by an incompatible version of this project "
                          f"({type(e).__name__}: {e}); re-run the step that logged it") from None


def check_program_model(model_uri: str) -> ModelInfo:
    """The model behind `model_uri` if it is a program this project logged (its pyfunc flavor rebuilds the
    program from plain files), else a one-line error."""
    info = check_model(model_uri)
    pyfunc = info.flavors.get("python_function", {})
    if flavor.PROGRAM not in (pyfunc.get("artifacts") or {}) or not str(pyfunc.get("model_code_path", "")).endswith(
            "model_code.py"):
        raise ConfigError(f"{model_uri} is not a program logged by this project (its pyfunc flavor has no "
                          f"`{flavor.PROGRAM}` files); give a model that a cot, rag, multihop or optimize run logged")
    return info


def program_model_of_run(run_id: str) -> str:
    """The URI of the program a step's run logged (the LoggedModel named after its variant)."""
    try:
        run = mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException as e:
        raise ConfigError(f"no run {run_id}: {e.message.splitlines()[0]}") from None
    variant = run.data.tags.get("variant")
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{run_id}' AND name = '{variant}'")
    ready = [m for m in models if m.status == LoggedModelStatus.READY]
    if not ready:
        raise ConfigError(f"run {run_id} logged no program (no READY model named {variant!r}); give an optimize "
                          "run that finished")
    return ready[0].model_uri


def logged_model_of(model_uri: str) -> LoggedModel | None:
    """The LoggedModel behind a `models:/` or `runs:/` URI, so an evaluation links to it."""
    model_id = check_model(model_uri).model_id
    return mlflow.get_logged_model(model_id) if model_id else None


def program_udf(spark, model_uri: str, *, num_threads: int | None, executor_env: dict[str, str]):
    """The program at `model_uri` as a Spark UDF answering a struct of its inputs on the executors
    (`executor_env`: how they trace, `pipelines.tracking.traces.executor_tracing`)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per model file, twice
    return mlflow.pyfunc.spark_udf(spark, model_uri, env_manager="local", extra_env=executor_env or None,
                                   params={"num_threads": num_threads} if num_threads else None)
