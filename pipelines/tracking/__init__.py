"""The one place the project talks to MLflow, one concern per module:

  store       the tracking store: URI, server check, sqlite creation, autolog
  runs        a step's run: where it opens, its config, how it always ends
  evaluation  datasets, scores with intervals, paired differences, per-example tables
  traces      evaluation traces: tags, model links, counts, assessments; where Spark executors trace
  serving     a loaded or served program's traces: on unless RAGQA_TRACING=false, dropped ones counted
  scorers     the project's metrics as MLflow scorers, beside MLflow's judges, by name
  assess      stored traces (a run's, a version's traffic, an experiment's) scored with genai.evaluate
  trace_export  the bulk trace writer (the one module on MLflow internals, tested against them)
  models      programs as MLflow models: log, load, a Spark UDF (the flavor itself: pipelines/flavor.py)
  candidates  an optimize run's best scored candidate programs, kept for ensembles
  registry    registration, scores on versions, the `champion` alias (rule: pipelines/evaluation/promotion.py)
  prompts     learned instructions and demos in the prompt registry
  usage       token use, cost and wall time of a step's phases
  optimizers  MIPROv2 trials and GEPA iterations as step metrics
  finetune    a finetune's loss per step, transcripts, size, time, memory and adapter
  judging/    the judge: people's labels on traces (HUMAN feedback) and review queues; aligned judges as
              versions of the experiment's scorer and prompt (`scoring.judge=` resolved to a local state
              file); MLflow's own
              judge alignment (SIMBA, MemAlign) beside the project's
  reports     what steps log beside evaluations: index, optimization, comparison, predictions
  sweeps      a Hydra sweep's parent run: opened, failed jobs recorded, the jobs compared, ended

Callers import the module they need; the package face keeps `setup` and `run`, which every step calls
first, and `load_program`, the README's way to load a logged program as a `dspy.Module`.

Elsewhere MLflow is imported only by the code it loads with a logged program: `pipelines/flavor.py`,
`pipelines/model_code.py` (which hands `tracking.serving` to the pyfunc), `pipelines/packaging.py` (the
pyfunc) and the retriever, whose span travels with the program. `lint-imports` holds every other module
to that (pyproject.toml).
"""

from pipelines.tracking.models import load_program
from pipelines.tracking.runs import run
from pipelines.tracking.store import setup

__all__ = ["load_program", "run", "setup"]
