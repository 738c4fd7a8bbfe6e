"""The code MLflow runs to load a logged program ("models from code"): the program is rebuilt from its
files by `ProgramModel.load_context`, so loading or serving it unpickles nothing."""

import mlflow

from pipelines.packaging import ProgramModel

mlflow.models.set_model(ProgramModel())
