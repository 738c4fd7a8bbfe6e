"""The code MLflow runs to load a logged program ("models from code"): the program is rebuilt from its
files by `ProgramModel.load_context`, so loading or serving it unpickles nothing. It traces through
`pipelines.tracking.serving`, handed in here, above both."""

import mlflow

from pipelines.packaging import ProgramModel
from pipelines.tracking import serving

mlflow.models.set_model(ProgramModel(tracing=serving))
