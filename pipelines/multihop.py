"""`mlflow run . -e multihop`: evaluate the multihop program on dev; log score, table and registered model."""

from pipelines.cli import entry

main = entry("multihop", "pipelines.steps.variant:run_variant")

if __name__ == "__main__":
    main()
