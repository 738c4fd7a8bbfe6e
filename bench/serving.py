"""What tracing costs a served program (BENCHMARKS.md, 11): a registered RAG behind `mlflow models serve`, the fake
LM answering each chat request after --latency s, asked one question per request by 1 and by --clients concurrent
clients. Settings: traced (MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_ID at a local `mlflow server` over sqlite),
untraced (RAGQA_TRACING=false), and traced with the tracking server stopped after start. p50/p95 latency per
request, throughput, and traces stored per request answered.

    .venv/bin/python bench/serving.py                       # 200 ms LM, 1 and 8 clients, 16 requests each
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time

import mlflow

import _common as common
from helpers import fake_lm_overrides, served, tracking_server

QUESTION = "how do I use {} (case {})?"
TOPICS = ["git rebase", "ssh keys", "python venvs", "docker volumes", "bash loops", "nginx proxies"]


def log_rag(api_base: str, store) -> tuple[str, str]:
    """A RAG program at the fake LM and embedder, logged and registered: (models:/ URI, its experiment id)."""
    from pipelines import tracking
    from pipelines.config import compose
    from pipelines.lm import build_adapter, build_lm
    from pipelines.programs import build_program
    from pipelines.steps.session import build_retriever
    from pipelines.tracking.models import log_program, new_model, program_signature

    cfg = compose("rag", ["experiment=smoke", *fake_lm_overrides(api_base), "embedder=openai",
                          f"embedder.api_base={api_base}", "embedder.api_key_env=null",
                          f"tracking.artifact_location={store}/artifacts"])
    tracking.setup(cfg)
    retriever, _ = build_retriever(cfg)
    program = build_program(cfg.program, cfg.lm, retriever)
    with mlflow.start_run() as run:
        model = new_model("rag", variant="rag")
        info = log_program(program, lm=build_lm(cfg.lm), adapter=build_adapter(cfg.lm), model=model,
                           signature=program_signature(program), dspy_flavor=False)
    version = mlflow.register_model(info.model_uri, "ragqa-bench-serving").version
    return f"models:/ragqa-bench-serving/{version}", run.info.experiment_id


def load(ask, clients: int, requests: int, offset: int) -> dict:
    """`requests` questions per client, `clients` at once; latencies (s), wall time and answers."""
    latencies, answers, lock = [], [], threading.Lock()

    def client(c: int) -> None:
        for i in range(requests):
            n = offset + c * requests + i
            started = time.perf_counter()
            (answer,) = ask({"question": QUESTION.format(TOPICS[n % len(TOPICS)], n)})["predictions"]
            with lock:
                latencies.append(time.perf_counter() - started)
                answers.append(answer)
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    failed = sum(bool(a["error"]) for a in answers)
    return {"latencies": sorted(latencies), "wall": wall, "answers": answers, "failed": failed}


def row(setting: str, clients: int, result: dict, traces: str) -> list:
    lat = result["latencies"]
    p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
    cells = [setting, clients, len(lat), 1000 * statistics.median(lat), 1000 * p95, len(lat) / result["wall"],
             result["failed"], traces]
    print(cells, flush=True)  # as it comes: a later failure keeps what was measured
    return cells


def stored(experiment: str, answers: list[dict], timeout: float = 60) -> int:
    """How many of the answers' traces reached the store (serving exports them asynchronously)."""
    wanted = {a["trace_id"] for a in answers if a["trace_id"]}
    deadline = time.monotonic() + timeout
    while True:
        found = {t.info.trace_id for t in mlflow.search_traces(locations=[experiment], return_type="list",
                                                               include_spans=False)} & wanted
        if len(found) == len(wanted) or time.monotonic() > deadline:
            return len(found)
        time.sleep(1)


def main(args) -> None:
    store = common.scratch("serving")
    common.isolate_mlflow(store)
    rows = []
    with common.fake_lm(latency=args.latency) as (api_base, _), contextlib.ExitStack() as server:
        uri = server.enter_context(tracking_server(store))
        mlflow.set_tracking_uri(uri)
        model_uri, experiment = log_rag(api_base, store)
        traced = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_ID": experiment}
        for setting, env in (("untraced", {**traced, "RAGQA_TRACING": "false"}), ("traced", traced)):
            with served(model_uri, store, env) as ask:
                load(ask, 1, 2, 10_000)  # warm-up: imports, connections
                for clients in (1, args.clients):
                    result = load(ask, clients, args.requests, 100 * clients)
                    count = stored(experiment, result["answers"]) if setting == "traced" else 0
                    rows.append(row(setting, clients, result, f"{count}/{len(result['answers'])}"))
                if setting == "traced":  # the tracking server goes away; the program keeps answering
                    server.close()
                    for clients in (1, args.clients):
                        result = load(ask, clients, args.requests, 1000 * clients)
                        rows.append(row("traced, tracking server stopped", clients, result, "0 (dropped)"))
    print(common.table(["setting", "clients", "requests", "p50 ms", "p95 ms", "requests/s", "failed",
                        "traces stored"], rows))
    print(common.machine())


if __name__ == "__main__":
    common.run_script(common.parser(__doc__, latency=0.2, clients=8, requests=16), main)
