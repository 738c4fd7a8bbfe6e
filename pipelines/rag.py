"""`mlflow run . -e rag`: evaluate the rag program on dev; log score, table and registered model."""

from pipelines.cli import entry

main = entry("rag", "pipelines.steps.variant:run_variant")

if __name__ == "__main__":
    main()
