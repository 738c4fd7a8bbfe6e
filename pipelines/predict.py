"""`mlflow run . -e predict -P model_uri=... -P input=FILE -P output=DIR`: a logged program answers a file
of questions on Spark; one run `predict` records what it did. Also `spark-submit pipelines/predict.py ...`."""

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    # Run as a file (spark-submit): this folder first on the path would shadow libraries (packaging.py).
    sys.path.pop(0)

from pipelines.cli import entry  # noqa: E402

main = entry("predict", "pipelines.steps.predict:run_predict")

if __name__ == "__main__":
    main()
