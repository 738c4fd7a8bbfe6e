"""Screenshots of the MLflow UI for the README, taken from a real store with headless Chromium.

Run the README's main job first, then (Chromium from Debian's `chromium` package):

    .venv/bin/python docs/screenshots.py                      # the project's sqlite:///mlflow.db
    .venv/bin/python docs/screenshots.py --store /path/to/dir  # a store elsewhere (mlflow.db inside)

It starts `mlflow ui` on a free loopback port, finds the experiment and the registered
model, and writes docs/runs.png, docs/models.png, docs/traces.png, docs/model-versions.png,
docs/trace.png (one RAG trace opened: its retrieval span, passages and assessments), and the main run's
docs/failure-modes.png and docs/quality-cost.png (its charts in the run's artifact view), and docs/review.png
(the Review page: the queues `mlflow run . -e review` made).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"error: the MLflow UI did not answer at {url} within {timeout:.0f} s") from None
            time.sleep(1)


def screenshot(chromium: str, url: str, out: Path, size: str = "1920,1080", budget_ms: int = 45000) -> None:
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={out}", f"--window-size={size}", f"--virtual-time-budget={budget_ms}", url],
                   check=True, capture_output=True, timeout=180)
    print(f"wrote {out}")


def targets(uri: str, experiment: str) -> dict[str, str]:
    """URL fragments of the three views, found through the API."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"error: no experiment {experiment!r} in {uri}; run the README's main job first")
    model = client.search_registered_models(max_results=1)[0].name
    pages = {"runs": f"#/experiments/{exp.experiment_id}/runs",
             "models": f"#/experiments/{exp.experiment_id}/models",
             "traces": f"#/experiments/{exp.experiment_id}/traces",
             "review": f"#/experiments/{exp.experiment_id}/review-queue",  # after `mlflow run . -e review`
             "model-versions": f"#/models/{model}"}
    # The main job's own charts, opened in its run's artifact view.
    main = client.search_runs([exp.experiment_id], "tags.mlflow.runName = 'main'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    if main:
        for chart in ("failure_modes", "quality_cost"):
            pages[chart.replace("_", "-")] = (f"#/experiments/{exp.experiment_id}/runs/{main[0].info.run_id}"
                                              f"/artifactPath/{chart}.png")
    # One RAG trace opened in the trace view: its `retrieve` span, passages and assessments. The newest
    # (the optimized RAG's): the view opens a trace only from the list's first page.
    rag = client.search_traces(locations=[exp.experiment_id], filter_string="tag.phase = 'optimized'",
                               max_results=1, order_by=["timestamp_ms DESC"])
    if rag:
        pages["trace"] = f"#/experiments/{exp.experiment_id}/traces?selectedEvaluationId={rag[0].info.trace_id}"
    return pages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=ROOT, help="directory holding mlflow.db")
    parser.add_argument("--experiment", default="ragqa-arena-tech")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("error: chromium not found; install it (apt-get install chromium)")
    uri = f"sqlite:///{args.store.resolve()}/mlflow.db"
    pages = targets(uri, args.experiment)
    port = free_port()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}  # no price-list download offline
    ui = subprocess.Popen([str(VENV_BIN / "mlflow"), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                           "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}/"
        wait_for(f"{base}health")
        args.out.mkdir(parents=True, exist_ok=True)
        for name, fragment in pages.items():
            # The trace drawer opens beside MLflow's assistant pane (wide enough to show both), once the
            # list has loaded: it needs more (virtual) time than the other pages.
            drawer = name == "trace"
            screenshot(chromium, base + fragment, args.out / f"{name}.png", size="2600,1200" if drawer else "1920,1080",
                       budget_ms=90000 if drawer else 45000)
    finally:
        os.killpg(ui.pid, 15)
        ui.wait(timeout=30)


if __name__ == "__main__":
    main()
