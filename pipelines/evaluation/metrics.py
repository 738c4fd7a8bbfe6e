"""The metrics' names and labels, and the two that need no judge. Every metric is on 0-100.

Token F1 and ROUGE-L compare words with the gold answer: no LM, so a rerun gives the same number.
recall@k scores retrieval where the data has gold document ids (`scoring.Scorer` counts the hits): on the
passages the answer step read, and for a multi-hop program on each search's own (`recall_at_k_hop<N>`).
The judged metrics are named here too; their judges are `judge.py` (SemanticF1) and `arena.py`.
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from collections.abc import Callable

from pipelines.evaluation import arena
from pipelines.evaluation.stats import tidy
from pipelines.schema import Metric

JUDGED = str(Metric.semantic_f1)
JUDGED_METRICS = (JUDGED, *arena.METRICS)  # the metrics an LM judge scores
RECALL = "recall_at_k"  # always scored for a retrieving program, never primary: CoT has none
HOP = "_hop"            # recall_at_k_hop1, ...: a multi-hop program's recall of each search on its own
LABELS = {JUDGED: "SemanticF1", "token_f1": "token F1", "rouge_l": "ROUGE-L", RECALL: "recall@k",
          arena.WIN: "arena win rate", arena.WIN_TIE: "arena win+tie rate", arena.FLIP: "arena order flip rate"}
NO_PREDICTION = "no prediction: LM call or output parsing failed"


def label(metric: str) -> str:
    """How a metric is named on the console and in charts: `recall_at_k_hop2` is `recall@k hop 2`."""
    if metric.startswith(RECALL + HOP):
        return f"{LABELS[RECALL]} hop {metric[len(RECALL + HOP):]}"
    return LABELS[metric]


def is_recall(metric: str) -> bool:
    return metric.startswith(RECALL)


def recall_metrics(prediction) -> tuple[str, ...]:
    """The recall metrics of a retrieving program's prediction: overall, and per search where it searched
    more than once; none for a program that does not retrieve."""
    if "doc_ids" not in prediction:
        return ()
    hops = len(prediction.get("hop_doc_ids") or [])
    return (RECALL, *(f"{RECALL}{HOP}{h}" for h in range(1, hops + 1) if hops > 1))


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def answer_tokens(text: str) -> list[str]:
    """SQuAD's normalisation: lowercase, drop punctuation, drop articles, split on whitespace."""
    return _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split()


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 (0-100): harmonic mean of the shared-token precision and recall."""
    pred, ref = answer_tokens(prediction), answer_tokens(gold)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return tidy(100 * 2 * precision * recall / (precision + recall))


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer  # imported on first use: it pulls in nltk (~2 s)

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, gold: str) -> float:
    """ROUGE-L F-measure (0-100, Porter-stemmed) from Google's `rouge-score`."""
    return tidy(100 * _rouge_scorer().score(gold, prediction)["rougeL"].fmeasure)


LEXICAL: dict[str, Callable[[str, str], float]] = {"token_f1": token_f1, "rouge_l": rouge_l}
