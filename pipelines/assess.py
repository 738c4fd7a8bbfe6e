"""`mlflow run . -e assess -P overrides="run_id=RUN scorers=[token_f1]"`: stored traces, scored after the fact."""

from pipelines.cli import entry
from pipelines.steps import run_assess

main = entry("assess", run_assess)

if __name__ == "__main__":
    main()
