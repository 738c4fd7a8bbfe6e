"""Programs as MLflow models: a LoggedModel per program version, logged with the project's flavor
(`pipelines/flavor.py`), and loaded back as the `dspy.Module` it was."""

from __future__ import annotations

import dspy
import mlflow
import pandas as pd
from mlflow.entities import LoggedModel
from mlflow.entities.model_registry import PromptVersion
from mlflow.models import Model, ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array

from pipelines import flavor, packaging
from pipelines.config import PROJECT_ROOT, ConfigError

# What a request to a served program looks like, shown with the model in the UI; answering it at log
# time would be an LM call per logged version, so MLflow's check of it is off.
EXAMPLE = pd.DataFrame({"question": ["How do I undo my last git commit but keep its changes?"]})


def new_model(name: str, *, variant: str, external: bool = False) -> LoggedModel:
    """The LoggedModel of a program version, created before its evaluation so traces and metrics
    link to it; `log_program` then fills it. `external`: a program measured here but logged by
    another run (the baseline inside `optimize`)."""
    create = mlflow.create_external_model if external else mlflow.initialize_logged_model
    return create(name=name, model_type="agent", tags={"variant": variant})


def program_signature(*, retrieves: bool, doc_id_type: str = "long", num_threads: int = 1) -> ModelSignature:
    """Questions in; per question the answer, its reasoning, for RAG the passages and their doc ids, and
    the row's error ("" when it answered). `num_threads`: rows answered at once, unless a call says."""
    outputs = [ColSpec("string", "reasoning"), ColSpec("string", "response")]
    if retrieves:
        outputs += [ColSpec(Array("string"), "context"), ColSpec(Array(doc_id_type), "doc_ids")]
    outputs.append(ColSpec("string", packaging.ERROR))
    return ModelSignature(inputs=Schema([ColSpec("string", "question")]), outputs=Schema(outputs),
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
                     input_example=EXAMPLE, validate_serving_input=False,
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
    try:
        pickled = pyfunc.get("loader_module") == "mlflow.dspy"
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
    model_id = check_model(model_uri).model_id
    return mlflow.get_logged_model(model_id) if model_id else None
