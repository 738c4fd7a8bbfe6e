"""A person labels an evaluation's traces on the MLflow UI's Review page, in a real browser (the system's
Chromium, driven by Playwright) against `mlflow server` on loopback; the judge entry point finds those
labels, measures its agreement with them, aligns, and the aligned judge shows on the Judges page."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from deploy.team_server import wait_healthy
from pipelines.config import compose
from pipelines.data import load_splits
from pipelines.steps.judge import run_judge, run_review
from pipelines.steps.variant import run_variant
from pipelines.tracking.evaluation import load_table
from pipelines.tracking.judging.labels import human_labels

from helpers import fake_overrides, free_port, learnable_judge, smoke, user_env

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As root in a closed network: no sandbox, no GPU, and none of Chromium's own connections to the internet.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
LABELLED = 12

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: apt-get install chromium")


@pytest.fixture
def ui_server(store, monkeypatch):
    """`mlflow server` on a loopback port over the test's store, as the tracking URI."""
    port = free_port()
    log = store / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{store}/server.db", "--artifacts-destination",
             str(store / "served"), "--workers", "1"],
            env=user_env({"LITELLM_LOCAL_MODEL_COST_MAP": "True"}), stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, timeout=180)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        mlflow.set_tracking_uri(url)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def label_on_review_page(page, url: str, experiment_id: str, queue: str, questions: dict[str, str]) -> dict[str, bool]:
    """Open the queue on the Review page and label each trace as a person would: pass when the response
    gives the right way, fail otherwise, with a comment; returns what was given, by trace id. `questions`
    (by trace id) only tells when the page shows the trace its address names: the two change apart."""
    from playwright.sync_api import expect

    page.goto(f"{url}/#/experiments/{experiment_id}/review-queue?workflowType=genai")
    page.get_by_text(queue, exact=True).click()
    page.get_by_role("button", name="Start review").click()
    given = {}
    for done in range(LABELLED):
        expect(page.get_by_text(f"{done} of {LABELLED} reviewed")).to_be_visible(timeout=30_000)
        trace_id = re.search(r"selectedItemId=(tr-[0-9a-f]+)", page.url).group(1)
        expect(page.locator("main")).to_contain_text(questions[trace_id], timeout=30_000)
        passed = "the right way" in page.locator("main").inner_text()
        page.get_by_text("pass" if passed else "fail", exact=True).click()
        page.get_by_placeholder("Rationale (optional)").fill("gives the right way" if passed else "no usable answer")
        page.get_by_role("button", name="Submit").click()
        given[trace_id] = passed
    expect(page.get_by_text(f"Completed ({LABELLED})", exact=True)).to_be_visible(timeout=30_000)  # back on the queue
    return given


def test_labels_given_on_the_review_page_reach_the_judge_and_its_aligned_version_the_judges_page(
        ui_server, fake, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    dev = load_splits(compose("cot", ["experiment=smoke", f"data.dev_size={LABELLED}"]).data).dev
    learnable_judge(fake, [e.question for e in dev])
    evaluated = run_variant(smoke("cot", tmp_path, *fake_overrides(fake), f"data.dev_size={LABELLED}"))
    queued = run_review(compose("review", [f"run_id={evaluated.run_id}"]))
    experiment_id = mlflow.get_run(evaluated.run_id).info.experiment_id
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            questions = {r["trace_id"]: r["question"] for r in load_table(evaluated.run_id, "eval/dev_results.json")}
            given = label_on_review_page(page, ui_server, experiment_id, queued.queue, questions)
            assert sum(given.values()) == LABELLED // 4  # one answer in four gives the right way

            found = {x.trace_id: x.value for x in human_labels("ragqa-arena-tech", "correct")}
            assert found == given
            judge_cfg = compose("judge", [*fake_overrides(fake), "align=true",
                                          f"tracking.artifact_location={tmp_path}/artifacts"])
            judged = run_judge(judge_cfg)
            metrics = mlflow.get_run(judged.run_id).data.metrics
            # Unaligned, the judge passes every short answer: it agrees on the long ones, half of them.
            assert metrics["judge_labelled_traces"] == LABELLED and metrics["judge_accuracy"] == 0.5
            assert metrics["judge_accuracy_ci_low"] < 0.5 < metrics["judge_accuracy_ci_high"]

            page.goto(f"{ui_server}/#/experiments/{experiment_id}/judges?workflowType=genai")
            expect(page.get_by_text(f"Version {judged.registered.version}", exact=True)).to_be_visible(timeout=30_000)
            page.get_by_text(judge_cfg.judge_name, exact=True).click()  # opens its instructions
            expect(page.locator("main textarea").first).to_have_value(re.compile("Worked verdict 1"))
            if page.get_by_role("button", name="Close").count():  # MLflow's Assistant panel, beside the page
                page.get_by_role("button", name="Close").last.click()
            page.screenshot(path=str(tmp_path / "judges.png"))
        finally:
            browser.close()
