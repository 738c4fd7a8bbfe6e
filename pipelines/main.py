"""`mlflow run .`: cot, rag and optimize as child runs of one parent, with a comparison chart."""

from pipelines.cli import entry

main = entry("main", "pipelines.steps.pipeline:run_pipeline", with_overrides=True)

if __name__ == "__main__":
    main()
