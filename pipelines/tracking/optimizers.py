"""Optimizer progress as step metrics of the optimize run: MIPROv2's trial scores, GEPA's iterations."""

from __future__ import annotations

import logging

import dspy
import mlflow

log = logging.getLogger(__name__)


def log_optimizer_trials(program: dspy.Module) -> None:
    """MIPROv2's trial scores as step metrics (steps = trial numbers), and the best one."""
    trials = getattr(program, "trial_logs", None) or {}
    for trial, entry in sorted(trials.items()):
        if entry.get("full_eval_score") is not None:
            mlflow.log_metric("mipro_trial_score", float(entry["full_eval_score"]), step=int(trial))
        if entry.get("mb_score") is not None:
            mlflow.log_metric("mipro_minibatch_score", float(entry["mb_score"]), step=int(trial))
    if getattr(program, "score", None) is not None:
        mlflow.log_metric("mipro_best_score", float(program.score))


class GEPAProgress:
    """GEPA callback (`gepa_kwargs={"callbacks": [...]}`) that logs its progress as step metrics.

    Step 0 is the seed program, then one step per iteration: metric calls spent (`gepa_metric_calls`),
    the best score on its validation set so far (`gepa_best_val_score`, 0-100 like `semantic_f1`),
    candidates kept (`gepa_candidates`), proposals made (`gepa_proposals`) and reflections that gave
    no usable instruction (`gepa_unusable_proposals`: unparseable or empty; GEPA skips those).
    """

    def __init__(self):
        self.run_id: str | None = None
        self.reflections = 0
        self.proposals = 0
        self._unusable_logged = 0

    @property
    def unusable(self) -> int:
        return self.reflections - self.proposals

    def on_optimization_start(self, event) -> None:
        self.run_id = mlflow.active_run().info.run_id  # the optimize run; eval child runs come and go

    def on_valset_evaluated(self, event) -> None:
        if event["iteration"] == 0:
            mlflow.log_metrics({"gepa_best_val_score": 100 * event["average_score"],
                                "gepa_metric_calls": event["num_examples_evaluated"]}, step=0, run_id=self.run_id)

    def on_proposal_start(self, event) -> None:
        self.reflections += 1

    def on_proposal_end(self, event) -> None:
        self.proposals += 1

    def on_iteration_end(self, event) -> None:
        state = event["state"]
        if self.unusable > self._unusable_logged:
            log.warning("GEPA iteration %d: the reflection LM gave no usable instruction (%d so far); "
                        "GEPA keeps its best candidate and goes on", event["iteration"], self.unusable)
            self._unusable_logged = self.unusable
        mlflow.log_metrics({"gepa_metric_calls": state.total_num_evals,
                            "gepa_best_val_score": 100 * max(state.program_full_scores_val_set),
                            "gepa_candidates": len(state.program_candidates) - 1,
                            "gepa_proposals": self.proposals, "gepa_unusable_proposals": self.unusable},
                           step=event["iteration"], run_id=self.run_id)
