"""`mlflow run . -e optimize`: compile RAG with MIPROv2, compare with the baseline, promote the winner."""

from pipelines.cli import entry
from pipelines.steps import run_optimize

main = entry("optimize", run_optimize)

if __name__ == "__main__":
    main()
