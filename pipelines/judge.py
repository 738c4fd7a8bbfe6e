"""`mlflow run . -e judge -P overrides="labels=labels.csv"`: the judge's agreement with people's labels."""

from pipelines.cli import entry

main = entry("judge", "pipelines.steps.judge:run_judge")

if __name__ == "__main__":
    main()
