"""`mlflow run . -e ensemble -P overrides="ensemble.candidates_of=RUN_ID"`: evaluate an ensemble on dev; log
score, table, its members and the registered model."""

from pipelines.cli import entry

main = entry("ensemble", "pipelines.steps.variant:run_variant")

if __name__ == "__main__":
    main()
