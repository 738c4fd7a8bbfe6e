"""`mlflow run . -e cot`: evaluate the cot program on dev; log score, table and registered model."""

from pipelines.cli import entry

main = entry("cot", "pipelines.steps.variant:run_variant")

if __name__ == "__main__":
    main()
