"""`mlflow run . -e cot`: evaluate the cot program on dev; log score, table and registered model."""

from pipelines.cli import entry
from pipelines.steps import run_variant

main = entry("cot", run_variant)

if __name__ == "__main__":
    main()
