"""An optimize run's scored candidate programs: kept as DSPy JSON state beside the run's program, so an
ensemble can be made of the best of them later (`ensemble.candidates_of=RUN_ID`) without a copy of the
program, its index or its LM per candidate."""

from __future__ import annotations

import tempfile
from pathlib import Path

import dspy
import mlflow

from pipelines.errors import ConfigError
from pipelines.tracking.evaluation import load_table, log_table

CANDIDATES = "optimizer/candidates"  # <rank>.json per candidate, and the table candidates.json beside it
TABLE = "optimizer/candidates.json"


def log_candidates(ranked: list[tuple[float, dspy.Module]], keep: int) -> None:
    """The `keep` best of `ranked` ((score 0-100, program), best first) in the active run."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rank, (score, program) in enumerate(ranked[:keep], start=1):
            program.save(str(Path(tmp) / f"{rank}.json"))
            rows.append({"rank": rank, "score": round(score, 4), "state": f"{CANDIDATES}/{rank}.json"})
        if rows:
            mlflow.log_artifacts(tmp, CANDIDATES)
    log_table(rows, TABLE)
    mlflow.log_metric("candidates_kept", len(rows))


def candidate_states(run_id: str, n: int) -> list[tuple[dict, Path]]:
    """The `n` best candidates an optimize run kept: (table row, downloaded state file), best first."""
    rows = load_table(run_id, TABLE)
    if not rows:
        raise ConfigError(f"run {run_id} kept no candidate programs ({TABLE}): ensemble.candidates_of takes an "
                          "optimize run of this project version; re-run optimize, or list members with "
                          "ensemble.members=[...]")
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CANDIDATES))
    return [(row, local / Path(row["state"]).name) for row in sorted(rows, key=lambda r: r["rank"])[:n]]
