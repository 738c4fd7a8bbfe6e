"""A small OpenAI-compatible LM and embedding server for loopback tests and benchmarks.

`/v1/chat/completions` answers after a fixed latency with every requested output field filled in,
in the format the request asks for: a JSON object for `response_format` (json_object or json_schema,
as JSONAdapter and the schema-constrained adapter send), else ChatAdapter's `[[ ## field ## ]]`
sections. Number fields get `score`, so `score=1.0` makes a SemanticF1 judge pass every example, as
a capable LM's judge often does (`mode="ok"`); `garbage` and `empty` exercise failure paths. A field
with fixed options (an enum, a `Literal`) gets its first: a pairwise judge that prefers answer 1.
With `demo_score`, it also behaves like an LM that few-shot demos help: a request that carries demos
(more than a system and a user message) is answered with a marker, and a judge request that sees the
marker gets `demo_score` instead of `score`, so optimizers have something to prefer.
With `judge_fail`, a judge that cannot always give a verdict: a SemanticF1 judge request (one asking for
`precision` and `recall`) about a question whose hash falls in that share gets unparseable output; the
same questions every time, so a test knows which (`judge_fails`).
`field_answers` lets a test answer chosen output fields itself: `fake.field_answers["query"] = fn` makes
every request that asks for `query` get `fn(request)` there (None: the usual fake value), e.g. a query
writer that knows words of the gold document, or members of an ensemble that answer differently.
`/v1/embeddings` returns deterministic hashed bag-of-words vectors, so retrieval finds overlapping
words. Run standalone: `python tests/fake_lm.py --port 8799 --latency 0.1 --score 1.0`.

One server can play several LMs at once: the requested model's name overrides the server's defaults
with `-`-separated words, e.g. `openai/fake-garbage`, `openai/fake-score0.7-demo1.0`, `openai/fake-ms50`,
`openai/fake-score0.9-judgefail0.5` (mode; score; demo_score; latency in ms; judge failure share). So a
test session shares one server, each test choosing its LM's behaviour by name, and the LMs of one job
(task LM, judge, reflection LM) can differ.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

# ChatAdapter asks for fields as `[[ ## name ## ]]` and describes them as "1. `name` (type): ...".
_FIELD_MARKER = re.compile(r"\[\[ ## (\w+) ## \]\]")
_FIELD_TYPE = re.compile(r"`(\w+)` \((\w+)")
_LITERAL = re.compile(r"`(\w+)` \(Literal\[([^\]]*)\]\)")  # "`verdict` (Literal['1', '2', '0'])"
_NUMBER_TYPES = {"float": "number", "int": "integer", "bool": "boolean"}
DEMO_MARKER = "(answered with demos)"


def fake_value(name: str, schema: dict, score: float = 0.5, suffix: str = ""):
    kind = schema.get("type")
    if schema.get("enum"):
        return schema["enum"][0]
    if kind in ("number", "integer"):
        return score if kind == "number" else 1
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    return f"fake {name}{suffix}"[: schema.get("maxLength", 10_000)]


def requested_fields(request: dict) -> tuple[dict[str, dict], str]:
    """Output fields and their JSON schemas, and whether to answer as "json" or "chat" sections."""
    response_format = request.get("response_format") or {}
    schema = response_format.get("schema") or (response_format.get("json_schema") or {}).get("schema")
    if schema:
        return dict(schema.get("properties") or {}), "json"
    messages = request.get("messages") or [{}]
    system = str(messages[0].get("content", ""))
    outputs = system.split("Your output fields are:", 1)[-1].split("All interactions", 1)[0]
    types = {name: {"type": _NUMBER_TYPES.get(kind, "string")} for name, kind in _FIELD_TYPE.findall(outputs)}
    types |= {name: {"type": "string", "enum": re.findall(r"'([^']*)'", options)}
              for name, options in _LITERAL.findall(outputs)}
    last = str(messages[-1].get("content", ""))
    names = [n for n in dict.fromkeys(_FIELD_MARKER.findall(last.split("Respond with", 1)[-1])) if n != "completed"]
    fmt = "json" if response_format.get("type") == "json_object" else "chat"
    return {n: types.get(n, {"type": "string"}) for n in names}, fmt


def hashed_embedding(text: str, dims: int) -> list[float]:
    """Bag of words hashed into `dims` buckets: texts sharing words are near each other."""
    vector = np.zeros(dims, dtype=np.float32)
    for word in re.findall(r"\w+", text.lower()):
        vector[int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little") % dims] += 1.0
    norm = float(np.linalg.norm(vector))
    return (vector / norm if norm else vector).tolist()


_MODES = ("ok", "garbage", "empty")
_NUMBERS = re.compile(r"^(score|demo|ms|judgefail)([\d.]+)$")
_QUESTION = re.compile(r"\[\[ ## question ## \]\]\s*(.*?)\s*(?:\[\[ ## |$)", re.S)
UNPARSEABLE = "<<<this is not the JSON you asked for"


@dataclasses.dataclass(frozen=True)
class Behaviour:
    mode: str
    score: float
    demo_score: float
    latency: float
    judge_fail: float = 0.0  # the share of questions on which a SemanticF1 verdict does not parse


def fake_model(mode: str = "ok", *, score: float | None = None, demo_score: float | None = None,
               latency_ms: int | None = None, judge_fail: float | None = None) -> str:
    """The model name that asks the fake for this behaviour (LiteLLM's `openai/` prefix included)."""
    words = [mode] + [f"{k}{v:g}" for k, v in (("score", score), ("demo", demo_score), ("ms", latency_ms),
                                                ("judgefail", judge_fail)) if v is not None]
    return "openai/fake-" + "-".join(words)


def judge_fails(question: str, share: float) -> bool:
    """Whether a judge failing on `share` of the questions fails on this one: by a hash of the question."""
    return int.from_bytes(hashlib.sha256(question.strip().encode()).digest()[:8], "big") < share * 2**64


class FakeLM:
    def __init__(self, latency: float = 0.0, mode: str = "ok", host: str = "127.0.0.1", port: int = 0,
                 die_after: int | None = None, score: float = 0.5, demo_score: float | None = None,
                 keep_prompts: bool = False):
        self.latency, self.mode, self.die_after, self.score = latency, mode, die_after, score
        self.demo_score = demo_score  # None: as `score`
        self.keep_prompts = keep_prompts
        self.calls = 0  # chat completions
        self.embedding_calls = 0
        self.prompts: list[str] = []  # with keep_prompts: every chat request's messages, joined
        self.field_answers: dict = {}  # output field -> fn(request) -> its value, or None for the fake one
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path.rstrip("/").endswith("/embeddings"):
                    with fake._lock:
                        fake.embedding_calls += 1
                    self._send(200, fake.embeddings(request))
                    return
                with fake._lock:
                    fake.calls += 1
                    if fake.keep_prompts:
                        fake.prompts.append("\n".join(str(m.get("content", "")) for m in request["messages"]))
                    dying = fake.die_after is not None and fake.calls > fake.die_after
                if dying:  # simulate a crash: stop serving, drop this connection unanswered
                    threading.Thread(target=fake.stop, daemon=True).start()
                    self.close_connection = True
                    return
                behaviour = fake.behaviour(str(request.get("model", "")))
                time.sleep(behaviour.latency)
                self._send(200, fake.completion(request, behaviour))

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.api_base = f"http://{host}:{self.server.server_address[1]}/v1"
        self._thread: threading.Thread | None = None

    def behaviour(self, model: str) -> Behaviour:
        """This server's defaults, overridden by the words of the requested model's name."""
        found = {"mode": self.mode, "score": self.score, "ms": self.latency * 1000}
        for word in model.rpartition("/")[2].split("-")[1:]:
            number = _NUMBERS.match(word)
            if word in _MODES:
                found["mode"] = word
            elif number:
                found[number[1]] = float(number[2])
        demo = found.get("demo", found["score"] if self.demo_score is None else self.demo_score)
        return Behaviour(found["mode"], found["score"], demo, found["ms"] / 1000, found.get("judgefail", 0.0))

    def reset(self) -> FakeLM:
        """Forget the calls and prompts seen so far (a session's server, between tests)."""
        with self._lock:
            self.calls = self.embedding_calls = 0
            self.prompts.clear()
            self.field_answers.clear()
        return self

    def completion(self, request: dict, behaviour: Behaviour | None = None) -> dict:
        behaviour = behaviour or self.behaviour(str(request.get("model", "")))
        fields, fmt = requested_fields(request)
        messages = request.get("messages") or []
        question = _QUESTION.search(str((messages or [{}])[-1].get("content", "")))
        judging = {"precision", "recall"} <= set(fields)
        if behaviour.mode == "garbage" or (judging and question and judge_fails(question[1], behaviour.judge_fail)):
            content = UNPARSEABLE
        elif behaviour.mode == "empty":
            content = json.dumps({name: "" if s.get("type") == "string" else None for name, s in fields.items()})
        else:
            demos = any(DEMO_MARKER in str(m.get("content")) for m in messages)
            score = behaviour.demo_score if demos else behaviour.score
            suffix = f" {DEMO_MARKER}" if len(messages) > 2 else ""
            values = {name: fake_value(name, s, score, suffix) for name, s in fields.items()}
            for name, answer in self.field_answers.items():
                if name in values and (value := answer(request)) is not None:
                    values[name] = value
            if fmt == "json":
                content = json.dumps(values)
            else:
                content = "".join(f"[[ ## {n} ## ]]\n{v}\n\n" for n, v in values.items()) + "[[ ## completed ## ]]"
        prompt_chars = sum(len(str(m.get("content", ""))) for m in request.get("messages", []))
        return {
            "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
            "model": request.get("model", "fake"),
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": prompt_chars // 4, "completion_tokens": len(content) // 4,
                      "total_tokens": (prompt_chars + len(content)) // 4},
        }

    def embeddings(self, request: dict) -> dict:
        texts = request.get("input") or []
        texts = [texts] if isinstance(texts, str) else texts
        dims = int(request.get("dimensions") or 512)
        data = [{"object": "embedding", "index": i, "embedding": hashed_embedding(str(t), dims)}
                for i, t in enumerate(texts)]
        tokens = sum(len(str(t)) for t in texts) // 4
        return {"object": "list", "data": data, "model": request.get("model", "fake"),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def start(self) -> FakeLM:
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8799)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--mode", choices=["ok", "garbage", "empty"], default="ok")
    parser.add_argument("--score", type=float, default=0.5, help="value of every number field (judge scores)")
    args = parser.parse_args()
    lm = FakeLM(args.latency, args.mode, args.host, args.port, score=args.score)
    print(f"fake LM at {lm.api_base}", flush=True)
    lm.server.serve_forever()
