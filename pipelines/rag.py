"""`mlflow run . -e rag`: evaluate the rag program on dev; log score, table and registered model."""

from pipelines.cli import entry
from pipelines.steps import run_variant

main = entry("rag", run_variant)

if __name__ == "__main__":
    main()
