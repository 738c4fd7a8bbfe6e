"""`mlflow run . -e review -P overrides="run_id=RUN"`: a run's dev traces into a review queue."""

from pipelines.cli import entry

main = entry("review", "pipelines.steps.judge:run_review")

if __name__ == "__main__":
    main()
