"""The LM from config: schema-constrained decoding, the embedded server's bookkeeping, clear errors."""

import json
import os
import re
import threading
import time

import dspy
import pytest

from pipelines import server
from pipelines.config import compose
from pipelines.errors import ConfigError, LMServerError
from pipelines.lm import build_lm, ensure_reachable, output_schema
from pipelines.server import ensure_server, process_id, running_servers


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


def test_missing_model_package_is_reported(tmp_path):
    with pytest.raises(LMServerError, match="not installed"):
        ensure_server({"gguf": "no_such_pkg/model.gguf", "n_ctx": 512, "state_dir": str(tmp_path)})


def test_running_servers_lists_only_live_processes(tmp_path):
    me = process_id(os.getpid())
    pid, started = me.split("-")
    (tmp_path / "live.json").write_text(json.dumps({"process": me, "api_base": "http://127.0.0.1:1/v1"}))
    reused = f"{pid}-{float(started) - 100:.2f}"  # our pid, but another process's start time: a reused pid
    (tmp_path / "reused.json").write_text(json.dumps({"process": reused, "api_base": "http://127.0.0.1:2/v1"}))
    (tmp_path / "dead.json").write_text(json.dumps({"process": f"{2**22 + 12345}-1.00", "api_base": "x"}))
    (tmp_path / "torn.json").write_text("{not json")
    assert [s["api_base"] for s in running_servers(tmp_path)] == ["http://127.0.0.1:1/v1"]


def test_a_user_that_came_and_went_between_two_looks_restarts_the_keep_alive(tmp_path, monkeypatch):
    monkeypatch.setattr(server, "WATCH_INTERVAL", 0.05)
    stopped = []

    def stop(code):
        stopped.append(time.monotonic())
        raise SystemExit(code)

    monkeypatch.setattr(server.os, "_exit", stop)
    users = tmp_path / "k.users"
    users.mkdir()
    watcher = threading.Thread(target=server.watch_users, args=(tmp_path, "k", 1.0), daemon=True)
    watcher.start()
    time.sleep(0.8)  # idle for most of its keep_alive
    came = time.monotonic()
    (users / "999999999-1.00").touch()  # registered and already dead by the watchdog's next look
    watcher.join(timeout=5)
    assert stopped and stopped[0] - came >= 1.0, "stopped before keep_alive had passed since the last user"
    assert list(users.iterdir()) == []


def test_the_json_adapters_write_finetuning_transcripts_as_they_prompt_and_answer():
    from pipelines.lm import JSONAdapter, SchemaJSONAdapter

    signature = dspy.Signature("question -> reasoning, response")
    for adapter in (JSONAdapter(), SchemaJSONAdapter(max_field_chars=100)):
        data = adapter.format_finetune_data(signature, [], {"question": "why?"},
                                            {"reasoning": "because", "response": "it is so"})
        *prompt, answer = data["messages"]
        assert prompt == adapter.format(signature=signature, demos=[], inputs={"question": "why?"})
        assert answer["role"] == "assistant"
        assert json.loads(answer["content"]) == {"reasoning": "because", "response": "it is so"}
