"""The project's metrics as MLflow scorers, checked by name before any trace is read; the count of traces a
served program could not write."""

import logging

import pytest

from pipelines.errors import ConfigError
from pipelines.tracking import scorers
from pipelines.tracking.serving import DroppedTraces

GOLD = {"expected_response": "run git reset --soft HEAD~1", "expected_doc_ids": [3, 7]}


def test_lexical_and_recall_scorers_score_the_traced_answer_against_its_expectations():
    token_f1, rouge, recall = scorers.build_scorers(["token_f1", "rouge_l", "recall_at_k"])
    outputs = {"response": "run git reset --soft HEAD~1", "doc_ids": [7, 1, 2]}
    assert token_f1(outputs=outputs, expectations=GOLD) == 100.0
    assert token_f1(outputs={"response": "delete the repository"}, expectations=GOLD) == 0.0
    assert rouge(outputs=outputs, expectations=GOLD) == 100.0
    assert recall(outputs=outputs, expectations=GOLD) == 50.0


def test_a_scorer_without_a_gold_answer_says_so_instead_of_scoring_zero():
    token_f1, recall = scorers.build_scorers(["token_f1", "recall_at_k"])
    missing = token_f1(outputs={"response": "anything"}, expectations={})
    assert missing.value is None and "expected_response" in missing.error.error_message
    assert recall(outputs={"response": "x"}, expectations=GOLD).value is None  # a program that does not retrieve


def test_bad_scorer_names_and_judges_without_a_model_are_one_line():
    with pytest.raises(ConfigError, match="no scorer named groundedness"):
        scorers.check_names(["token_f1", "groundedness"], judge_model="openai:/x", guidelines=None)
    with pytest.raises(ConfigError, match="retrieval_groundedness, semantic_f1 need a judge model"):
        scorers.check_names(["retrieval_groundedness", "semantic_f1"], judge_model=None, guidelines=None)
    with pytest.raises(ConfigError, match="guidelines needs guidelines"):
        scorers.check_names(["guidelines"], judge_model="openai:/x", guidelines=[])


def test_dropped_traces_are_counted_and_only_the_first_is_a_warning():
    dropped = DroppedTraces()

    def record(message, level=logging.WARNING):
        return logging.LogRecord("mlflow.tracing.export.mlflow_v3", level, __file__, 1, message, (), None)

    first, second = record("Failed to send trace to MLflow backend: refused"), record("Failed to send trace: x")
    assert dropped.filter(first) and "answers are unaffected" in first.getMessage()
    assert not dropped.filter(second) and dropped.count == 2
    assert dropped.filter(record("something else")) and dropped.count == 2  # other warnings pass untouched
