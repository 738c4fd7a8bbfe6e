"""How programs are scored and compared, one concern per module:

  scoring     metrics per example through dspy.Evaluate, averaged with intervals
  stats       bootstrap intervals and paired comparisons (pure functions)
  promotion   the champion rule (pure functions)
  analysis    failure modes, cost per question, the Pareto front (pure functions)
  meter       LM calls, tokens and dollars of one program call
  feedback    SemanticF1 with feedback, GEPA's metric
  report      what runs show a reader: tables, readable prompts, charts
"""
