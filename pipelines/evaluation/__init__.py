"""How programs are scored and compared, one concern per module:

  metrics     the metrics' names, and token F1 and ROUGE-L (no judge)
  judge       SemanticF1, the LM judge
  arena       RAG-QA Arena's pairwise judge and win rates
  scoring     the scoring config, and metrics per example through dspy.Evaluate, one row each
  result      an evaluation's rows averaged with intervals; two results compared paired
  stats       bootstrap intervals and paired comparisons (pure functions)
  promotion   the champion rule (pure functions)
  analysis    failure modes, cost per question, the Pareto front (pure functions)
  meter       LM calls, tokens and dollars of one program call
  feedback    SemanticF1 with feedback, GEPA's metric
  report      what runs show a reader: tables, readable prompts, charts
"""
