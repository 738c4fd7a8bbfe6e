"""How far to trust the judge: people's labels on traces, and the judge's agreement with them.

  labels.py     labels from a CSV or JSONL file (trace_id, label[, rationale][, reviewer]), checked;
                several reviewers of one trace kept apart, their majority and disagreement both visible
  agreement.py  accuracy and Cohen's kappa for yes/no labels, Pearson and Spearman r for numeric ones,
                each with a bootstrap interval; the confusion table
"""
