"""`mlflow run . -e multihop`: evaluate the multihop program on dev; log score, table and registered model."""

from pipelines.cli import entry
from pipelines.steps import run_variant

main = entry("multihop", run_variant)

if __name__ == "__main__":
    main()
