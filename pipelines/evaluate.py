"""`mlflow run . -e evaluate -P model_uri=models:/NAME@champion -P split=test`: score a logged program."""

from pipelines.cli import entry

main = entry("evaluate", "pipelines.steps.evaluate:run_evaluate")

if __name__ == "__main__":
    main()
