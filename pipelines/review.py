"""`mlflow run . -e review -P overrides="run_id=RUN"`: a run's dev traces into a review queue."""

from pipelines.cli import entry
from pipelines.steps import run_review

main = entry("review", run_review)

if __name__ == "__main__":
    main()
