"""The embedded LM: schema-constrained decoding, server lifecycle, and clear errors."""

import json
import re

import dspy
import pytest

from pipelines.config import ConfigError, compose
from pipelines.data import load_splits
from pipelines.lm import build_adapter, build_lm, ensure_reachable, output_schema
from pipelines.scoring import JudgedF1
from pipelines.server import LMServerError, ensure_server


def test_output_schema_bounds_strings_to_share_the_token_budget():
    sig = dspy.Signature("question -> reasoning, response, confidence: float")
    schema = output_schema(sig, max_field_chars=600, max_tokens=200)
    assert schema["required"] == ["reasoning", "response", "confidence"]
    assert schema["properties"]["confidence"]["type"] == "number"
    assert schema["properties"]["response"]["maxLength"] == 250  # 200 tokens * 2.5 chars / 2 strings
    assert output_schema(sig, 100, None)["properties"]["reasoning"]["maxLength"] == 100


@pytest.mark.parametrize("max_field_chars", [3, None])
def test_grammar_from_the_schema_forbids_empty_strings(max_field_chars):
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    schema = output_schema(dspy.Signature("question -> response"), max_field_chars)
    assert schema["properties"]["response"]["minLength"] == 1
    rules = dict(line.split(" ::= ", 1) for line in json_schema_to_gbnf(json.dumps(schema)).splitlines() if line)
    # A required `char` (`char ...` or `char+`) right after the opening quote: `""` does not parse.
    assert re.match(r'"\\"" char[ +]', rules["response"]), rules["response"]


def test_openai_without_key_fails_before_any_work(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        build_lm(compose("cot", ["lm=openai"]).lm)


def test_unreachable_server_error_names_the_url():
    lm = build_lm(compose("cot", ["lm=openai", "lm.api_base=http://127.0.0.1:9/v1", "lm.api_key_env=null"]).lm)
    with pytest.raises(LMServerError, match=r"http://127\.0\.0\.1:9/v1"):
        ensure_reachable(lm)


def test_server_that_cannot_start_points_at_its_log(tmp_path):
    bogus = tmp_path / "broken.gguf"
    bogus.write_bytes(b"not a model")
    server = {"gguf": str(bogus), "n_ctx": 512, "startup_timeout": 60, "state_dir": str(tmp_path)}
    with pytest.raises(LMServerError, match=rf"exited with code .*see {tmp_path}/.*\.log"):
        ensure_server(server)


def test_missing_model_package_is_reported(tmp_path):
    with pytest.raises(LMServerError, match="not installed"):
        ensure_server({"gguf": "no_such_pkg/model.gguf", "n_ctx": 512, "state_dir": str(tmp_path)})


@pytest.mark.lm
def test_running_server_is_reused(local_server):
    cfg = compose("cot")
    assert ensure_server(dict(cfg.lm.server)) == local_server


@pytest.mark.lm
def test_constrained_local_lm_parses_cot_and_semantic_f1_on_two_examples(local_server):
    cfg = compose("cot", ["lm.cache=false"])
    lm, adapter = build_lm(cfg.lm), build_adapter(cfg.lm)
    examples = load_splits(cfg.data).dev[:2]
    metric = JudgedF1(lm)
    with dspy.context(lm=lm, adapter=adapter):
        for example in examples:
            pred = dspy.ChainOfThought("question -> response")(question=example.question)
            assert isinstance(pred.response, str) and pred.response.strip()
            assert isinstance(pred.reasoning, str)
            score = metric(example, pred)
            assert 0.0 <= score <= 1.0
    assert metric.failures == 0
    assert lm.kwargs["api_base"] == local_server
    sent = lm.history[-1]["kwargs"]["response_format"]
    assert sent["type"] == "json_object" and "recall" in sent["schema"]["properties"]


def test_running_servers_lists_only_live_processes(tmp_path):
    import json
    import os

    from pipelines.server import running_servers

    (tmp_path / "live.json").write_text(json.dumps({"pid": os.getpid(), "api_base": "http://127.0.0.1:1/v1"}))
    (tmp_path / "dead.json").write_text(json.dumps({"pid": 2**22 + 12345, "api_base": "http://127.0.0.1:2/v1"}))
    (tmp_path / "torn.json").write_text("{not json")
    assert [s["api_base"] for s in running_servers(tmp_path)] == ["http://127.0.0.1:1/v1"]
