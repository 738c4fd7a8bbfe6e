"""`mlflow run . -e judge -P overrides="labels=labels.csv"`: the judge's agreement with people's labels."""

from pipelines.cli import entry
from pipelines.steps import run_judge

main = entry("judge", run_judge)

if __name__ == "__main__":
    main()
