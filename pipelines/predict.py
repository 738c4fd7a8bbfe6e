"""`mlflow run . -e predict -P model_uri=... -P input=FILE -P output=DIR`: a logged program answers a file
of questions on Spark; one run `predict` records what it did."""

from pipelines.cli import entry
from pipelines.steps import run_predict

main = entry("predict", run_predict)

if __name__ == "__main__":
    main()
