"""`mlflow run . -e assess -P overrides="run_id=RUN scorers=[token_f1]"`: stored traces, scored after the fact."""

from pipelines.cli import entry

main = entry("assess", "pipelines.steps.assess:run_assess")

if __name__ == "__main__":
    main()
