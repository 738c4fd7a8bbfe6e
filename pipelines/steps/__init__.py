"""What each entry point does, one module per step family; each wires config to components and logs one run.

  session   what a step builds from config before a run opens: checks, LMs, judge, scorer, data, retriever
  results   the frozen results steps return (`StepOutcome`: run id, score, headline)
  in_run    inside a step's run: score a program, log and register it
  members   an ensemble's members, checked and loaded from config
  variant   cot, rag, multihop, ensemble: a program as configured, scored
  optimize  a program compiled by an optimizer, baseline and optimized scored
  evaluate  a logged program scored on a split
  predict   a logged program answering a file on Spark
  judge     review queues, the judge's agreement with people, its alignment
  assess    stored traces scored with MLflow's judges and the project's metrics
  pipeline  main: the steps checked, run as children, compared
"""
