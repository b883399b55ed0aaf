"""The run page (docs/run-page.md) as a person sees it: index.html of a finished smoke run (train,
verify, evaluate, sample, predict) and of a live one, opened in headless Chromium (Debian's
binary, driven by Playwright's client); and the page and TensorBoard files mirrored to a bucket.
Screenshots go to test-artifacts/."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright  # the client only; the browser is Debian's

from tests.helpers import ROOT, JobProcess, poll_until, run_job

pytestmark = pytest.mark.timeout(600)

CHROMIUM = shutil.which("chromium")
ARTIFACTS = ROOT / "test-artifacts"
PAGE_LIMIT_BYTES = 2_000_000
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install chromium; .ci/run installs it)"
)


def seen_in_chromium(page_file: Path, screenshot: str) -> dict:
    """Open ``page_file`` as a person would (file://) and report what the browser saw."""
    seen: dict = {"console_errors": [], "requests": []}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: seen["console_errors"].append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: seen["console_errors"].append(str(e)))
            page.on("request", lambda r: seen["requests"].append(r.url))
            page.goto(page_file.as_uri())
            page.wait_for_load_state("load")
            page.wait_for_timeout(300)  # the page's script ages the heartbeat once a second
            seen["status_line"] = page.inner_text("#status-line")
            seen["health"] = page.inner_text("#health")
            seen["heartbeat"] = page.inner_text("#heartbeat")
            seen["points"] = page.evaluate(
                """() => Object.fromEntries(Array.from(document.querySelectorAll("section.stage")).flatMap(s =>
                    Array.from(s.querySelectorAll("svg.chart")).map(c => [c.getAttribute("aria-label"),
                        Array.from(c.querySelectorAll("circle.point")).reduce((n, p) => {
                            n[p.dataset.series] = (n[p.dataset.series] || 0) + 1; return n; }, {})])))"""
            )
            seen["epochs_stated"] = page.evaluate(
                """() => Array.from(document.querySelectorAll("section.stage > p")).map(p => p.textContent)"""
            )
            seen["images"] = page.evaluate(
                "() => Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])"
            )
            seen["eval_tables"] = page.evaluate(
                """() => Array.from(document.querySelectorAll("#evaluation table")).map(t =>
                    Array.from(t.rows).map(r => Array.from(r.cells).map(c => c.textContent)))"""
            )
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / screenshot), full_page=True)
        finally:
            browser.close()
    return seen


@pytest.fixture(scope="module")
def finished_run(smoke_baseline, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The smoke run, then verify, evaluate, sample and predict; the page after each mode."""
    run = tmp_path_factory.mktemp("page") / "run"
    shutil.copytree(smoke_baseline, run)
    pages = {"train": (run / "index.html").read_text()}
    for mode in ("verify", "evaluate", "sample", "predict"):
        result = run_job(mode, "--preset", "smoke", "--run-uri", str(run), timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr
        pages[mode] = (run / "index.html").read_text()
    return run, pages


def test_each_mode_rewrites_the_page_with_what_it_made(finished_run):
    run, pages = finished_run
    assert "completed · stage 2/2 (transformer)" in pages["train"] and "not verified yet" in pages["train"]
    assert "verify passed" in pages["verify"] and "not evaluated yet" in pages["verify"]
    assert "<th>all-black</th>" in pages["evaluate"] and 'id="samples"><h2>Samples</h2><p class="muted">none yet' \
        in pages["evaluate"]
    assert pages["sample"].count('src="data:image/gif;base64,') >= 4  # animated samples, per class
    assert "none yet: run <code>predict</code>" not in pages["predict"]
    assert len(pages["predict"].encode()) < PAGE_LIMIT_BYTES


@needs_chromium
def test_a_finished_run_page_in_a_real_browser(finished_run):
    run, _ = finished_run
    seen = seen_in_chromium(run / "index.html", "run-page-finished.png")
    assert seen["console_errors"] == []
    assert seen["requests"] == [(run / "index.html").as_uri()]  # nothing but the file itself
    assert seen["status_line"].startswith("completed · stage 2/2 (transformer) · epoch 3/3")
    assert seen["health"] == "completed"
    epochs = {1: len((run / "metrics.jsonl").read_text().splitlines()),
              2: len((run / "stage2" / "metrics.jsonl").read_text().splitlines())}
    for stage, count in epochs.items():
        assert seen["points"][f"stage {stage} loss"] == {"train_loss": count, "val_loss": count}
        assert seen["points"][f"stage {stage} learning rate"] == {"lr": count}
    reconstruction = next(t for t in seen["eval_tables"] if t[0][:4] == ["metric", "model", "all-black", "mean-frame"])
    psnr = next(row for row in reconstruction if row[0].startswith("PSNR (dB"))
    assert all(float(cell) > 0 for cell in psnr[1:])  # the model's number beside both baselines'
    assert len(seen["images"]) >= 10
    assert all(complete and width > 0 for _, complete, width in seen["images"]), seen["images"]


@needs_chromium
def test_a_live_run_page_in_a_real_browser(tmp_path):
    run = tmp_path / "run"
    # A 10 s heartbeat: stale after 30 s, so that a slow machine's seconds between the page and
    # the browser cannot make a live run look stale.
    job = JobProcess.job("train", "--preset", "smoke", "--run-uri", str(run), "--set", "train.epochs=40",
                         "--set", "monitor.heartbeat_seconds=10")
    try:
        page_file = run / "index.html"
        poll_until(lambda: page_file.exists() and page_file.read_text().count('data-series="val_loss"') >= 2,
                   timeout=240, what="a page with two epochs")
        # A copy, as a person downloads it: the job may replace the file while the browser reads it.
        snapshot = tmp_path / "index.html"
        shutil.copy(page_file, snapshot)
        seen = seen_in_chromium(snapshot, "run-page-live.png")
    finally:
        job.send_signal(signal.SIGTERM)
        code = job.wait(timeout=60)
    assert code == 143
    assert (run / "index.html").read_text().count("preempted · stage 1/2") == 1  # the stopped job's last page
    assert seen["console_errors"] == [] and seen["requests"] == [snapshot.as_uri()]
    assert seen["status_line"].startswith("running · stage 1/2 (tokenizer) · epoch ")
    assert seen["health"] == "healthy"  # computed in the page from heartbeat_at
    assert " ago (" in seen["heartbeat"] and "by this computer's clock" in seen["heartbeat"]
    stated = next(p for p in seen["epochs_stated"] if "epoch(s) in metrics.jsonl" in p)
    count = int(stated.split(" epoch(s) in metrics.jsonl")[0].rsplit("; ", 1)[-1])
    assert count >= 2 and seen["points"]["stage 1 loss"] == {"train_loss": count, "val_loss": count}


def test_the_page_and_tensorboard_reach_the_bucket_and_status_html_reads_it_back(s3, tmp_path):
    uri = s3.uri()
    result = run_job("train", "--preset", "smoke", "--run-uri", uri, "--cache-dir", str(tmp_path / "cache"),
                     "--set", "train.epochs=2", "--set", "stage2.epochs=0", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    keys = s3.keys("run/")
    assert "run/index.html" in keys
    assert any(k.startswith("run/tensorboard/tokenizer/events.out.tfevents.") for k in keys), keys
    assert "completed · stage 1/1" in s3.get("run/index.html").decode()
    status = run_job("status", uri, "--html", str(tmp_path / "laptop.html"))
    assert status.returncode == 0, status.stdout + status.stderr
    page = (tmp_path / "laptop.html").read_text()
    assert "completed · stage 1/1" in page and page.count('data-series="val_loss"') == 2
