"""`mlflow run . -e optimize`: compile RAG with MIPROv2, compare with the baseline, promote the winner."""

from pipelines.cli import entry

main = entry("optimize", "pipelines.steps.optimize:run_optimize")

if __name__ == "__main__":
    main()
