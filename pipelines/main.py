"""`mlflow run .`: cot, rag and optimize as child runs of one parent, with a comparison chart."""

from __future__ import annotations

from hydra.core.hydra_config import HydraConfig

from pipelines.cli import entry
from pipelines.steps import run_pipeline

main = entry("main", lambda cfg: run_pipeline(cfg, HydraConfig.get().overrides.task))

if __name__ == "__main__":
    main()
