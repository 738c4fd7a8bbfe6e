"""A program as an MLflow model: the flavor module `mlflow.models.Model.log(flavor=pipelines.flavor, ...)`
saves with (MLflow's extension point for a custom flavor).

One MLmodel, two ways to load it:

  python_function  models from code: `pipelines/model_code.py` rebuilds the program from its plain
                   files (`pipelines/packaging.py`), so `mlflow.pyfunc.load_model`, `mlflow models
                   serve` and `mlflow.pyfunc.spark_udf` load it without unpickling anything
  dspy             MLflow's own DSPy flavor, written by `mlflow.dspy.save_model(...,
                   use_dspy_model_save=True)`, so `mlflow.dspy.load_model(uri)` returns the dspy.Module
                   with DSPy configured as it was; DSPy saves the program and its settings with
                   cloudpickle, so this half is optional (`tracking.dspy_flavor`)
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import dspy
import mlflow
import pandas as pd
from mlflow.models import Model, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.utils.file_utils import get_total_file_size

from pipelines import packaging
from pipelines.config import PROJECT_ROOT

MODEL_CODE = PROJECT_ROOT / "pipelines" / "model_code.py"
PROGRAM = "program"  # the pyfunc artifact holding the program's files


def save_model(path: str, mlflow_model: Model, *, program: dspy.Module, lm: dspy.LM, adapter: dspy.Adapter,
               signature: ModelSignature, input_example: pd.DataFrame, dspy_flavor: bool, pip_requirements: str,
               validate_serving_input: bool = False) -> None:
    """Write `program`, answering through `lm` and `adapter`, as an MLflow model directory at `path`.
    `validate_serving_input` is read by `Model.log`, which would answer the example through the LM."""
    with tempfile.TemporaryDirectory() as tmp:
        files = Path(tmp) / PROGRAM
        packaging.save(program, lm, adapter, files)
        mlflow.pyfunc.save_model(path, mlflow_model=mlflow_model, python_model=str(MODEL_CODE),
                                 artifacts={PROGRAM: str(files)}, code_paths=[str(PROJECT_ROOT / "pipelines")],
                                 signature=signature, input_example=input_example,
                                 pip_requirements=pip_requirements)
        if dspy_flavor:
            _add_dspy_flavor(Path(path), mlflow_model, files)


def _add_dspy_flavor(path: Path, mlflow_model: Model, files: Path) -> None:
    """MLflow's `dspy` flavor beside the pyfunc one, sharing its code directory. What it pickles is the
    program rebuilt from its files, with a fresh LM: no optimizer records, no call history, no key."""
    clean = packaging.load(files)
    with tempfile.TemporaryDirectory() as tmp, dspy.context(lm=clean.lm, adapter=clean.adapter, callbacks=[]):
        saved = Path(tmp) / "dspy"
        mlflow.dspy.save_model(clean.program, str(saved), use_dspy_model_save=True, pip_requirements=[])
        conf = Model.load(str(saved / MLMODEL_FILE_NAME)).flavors["dspy"]
        model_path = Path(conf["model_path"])  # data/model: DSPy's program; data/ also holds its settings
        shutil.copytree(saved / model_path.parts[0], path / model_path.parts[0], dirs_exist_ok=True)
    mlflow_model.add_flavor("dspy", **{**conf, "code": mlflow_model.flavors["python_function"].get("code")})
    mlflow_model.model_size_bytes = get_total_file_size(str(path))
    mlflow_model.save(str(path / MLMODEL_FILE_NAME))
