"""The one place the project talks to MLflow, one concern per module:

  store       the tracking store: URI, server check, sqlite creation, autolog
  runs        a step's run: where it opens, its config, how it always ends
  evaluation  datasets, scores with intervals, paired differences, per-example tables
  traces      evaluation traces: tags, model links, counts, assessments; where Spark executors trace
  serving     a loaded or served program's traces: on unless RAGQA_TRACING=false, dropped ones counted
  scorers     the project's metrics as MLflow scorers, beside MLflow's judges, by name
  assess      stored traces (a run's, a version's traffic, an experiment's) scored with genai.evaluate
  trace_export  the bulk trace writer (the one module on MLflow internals, tested against them)
  models      programs as MLflow models: log and load (the flavor itself: pipelines/flavor.py)
  candidates  an optimize run's best scored candidate programs, kept for ensembles
  registry    registration, scores on versions, the `champion` alias (rule: pipelines/evaluation/promotion.py)
  prompts     learned instructions and demos in the prompt registry
  usage       token use, cost and wall time of a step's phases
  optimizers  MIPROv2 trials and GEPA iterations as step metrics
  finetune    a finetune's loss per step, transcripts, size, time, memory and adapter
  judging/    the judge: people's labels on traces (HUMAN feedback) and review queues; aligned judges as
              versions of the experiment's scorer and prompt (`scoring.judge=` resolved); MLflow's own
              judge alignment (SIMBA, MemAlign) beside the project's
  reports     what steps log beside evaluations: index, optimization, comparison, predictions

Elsewhere MLflow is called by the retriever (its own trace span travels with the model), by
`pipelines/sweep.py` (its hooks act on the sweep's parent run, outside any active run), by the
program's pyfunc (`packaging.ProgramModel`, which traces through `tracking.serving`),
and by `pipelines/scale/batch.py` (`mlflow.pyfunc.spark_udf`).
"""

from pipelines.tracking.assess import assess, expectations_of, find_traces, where
from pipelines.tracking.candidates import candidate_states, log_candidates
from pipelines.tracking.evaluation import (
    comparison_metrics,
    estimate_metrics,
    failure_metrics,
    load_table,
    log_datasets,
    log_evaluation,
    log_metrics,
    log_spark_input,
    log_table,
)
from pipelines.tracking.finetune import log_finetune, step_metric
from pipelines.tracking.judging.labels import (
    check_traces,
    human_labels,
    labelled_rows,
    log_aligned_judge,
    log_gold,
    log_judge_agreement,
    log_labels,
    queue_for_review,
    queue_traffic_for_review,
)
from pipelines.tracking.judging.mlflow_align import (
    ALIGNERS,
    SIMBA_MIN_TRACES,
    lm_endpoint,
    log_mlflow_alignment,
    mlflow_align,
    mlflow_verdicts,
    pass_fail_judge,
)
from pipelines.tracking.judging.registry import RegisteredJudge, judge_model, register_judge, resolve_judge
from pipelines.tracking.models import (
    check_model,
    check_program_model,
    load_packaged,
    load_program,
    log_program,
    logged_model_of,
    new_model,
    program_model_of_run,
    program_signature,
)
from pipelines.tracking.optimizers import GEPAProgress, log_optimizer_trials
from pipelines.tracking.prompts import link_prompts, register_prompts
from pipelines.tracking.registry import CHAMPION, Registration, register, registered_version, tag_scores
from pipelines.tracking.reports import (
    log_analysis,
    log_comparison,
    log_ensemble,
    log_index,
    log_optimization,
    log_predictions,
)
from pipelines.tracking.runs import SWEEP_JOB_ENV, TrackingServerError, mask_overrides, run
from pipelines.tracking.store import setup
from pipelines.tracking.traces import (
    evaluating,
    evaluation_tracing,
    executor_tracing,
    held,
    last_trace_id,
    watch_traces,
)
from pipelines.tracking.usage import timed, usage
