"""A small OpenAI-compatible LM server for loopback tests and benchmarks.

It answers `/v1/chat/completions` after a fixed latency with a JSON object in the requested
`response_format` schema (`mode="ok"`), or with garbage / empty fields to exercise failure paths.
Run standalone: `python tests/fake_lm.py --port 8799 --latency 0.1`.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def fake_value(name: str, schema: dict):
    kind = schema.get("type")
    if kind in ("number", "integer"):
        return 0.5 if kind == "number" else 1
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    return f"fake {name}"[: schema.get("maxLength", 10_000)]


class FakeLM:
    def __init__(self, latency: float = 0.0, mode: str = "ok", host: str = "127.0.0.1", port: int = 0,
                 die_after: int | None = None):
        self.latency, self.mode, self.die_after = latency, mode, die_after
        self.calls = 0
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
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
                with fake._lock:
                    fake.calls += 1
                    dying = fake.die_after is not None and fake.calls > fake.die_after
                if dying:  # simulate a crash: stop serving, drop this connection unanswered
                    threading.Thread(target=fake.stop, daemon=True).start()
                    self.close_connection = True
                    return
                time.sleep(fake.latency)
                self._send(200, fake.completion(request))

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.api_base = f"http://{host}:{self.server.server_address[1]}/v1"
        self._thread: threading.Thread | None = None

    def completion(self, request: dict) -> dict:
        schema = ((request.get("response_format") or {}).get("schema") or {}).get("properties") or {}
        if self.mode == "garbage":
            content = "<<<this is not the JSON you asked for"
        elif self.mode == "empty":
            content = json.dumps({name: "" if s.get("type") == "string" else None for name, s in schema.items()})
        else:
            content = json.dumps({name: fake_value(name, s) for name, s in schema.items()})
        prompt_chars = sum(len(str(m.get("content", ""))) for m in request.get("messages", []))
        return {
            "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
            "model": request.get("model", "fake"),
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": prompt_chars // 4, "completion_tokens": len(content) // 4,
                      "total_tokens": (prompt_chars + len(content)) // 4},
        }

    def start(self) -> "FakeLM":
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
    args = parser.parse_args()
    lm = FakeLM(args.latency, args.mode, args.host, args.port)
    print(f"fake LM at {lm.api_base}", flush=True)
    lm.server.serve_forever()
