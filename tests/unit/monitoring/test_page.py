"""The run page (job.monitoring.page) from crafted run folders: what a person reads in it, that
nothing from the run folder becomes markup, and that broken files give a page that names them."""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import datetime, timezone

import pytest

from job.monitoring.page.write import PageWriter, page_html
from job.storage.folders import LocalFolder
from tests.crafted_runs import crafted_run, status, write_run

pytestmark = pytest.mark.timeout(60)

EVIL = "<script>alert('x')</script>"


def page(root) -> str:
    return page_html(LocalFolder(root), str(root), datetime.now(timezone.utc))


def points(html: str, series: str) -> list[str]:
    return re.findall(rf'<circle class="point" data-series="{series}" data-epoch="(\d+)"', html)


def test_a_running_run_shows_its_status_line_curves_and_checkpoint(tmp_path):
    html = page(write_run(tmp_path, crafted_run("running", val_losses=(0.4, 0.3, 0.2, 0.1))))
    assert "running · epoch 4/10 · step 40/100 (40.0%) · loss 0.50000 · 12.5 samples/s · ETA 10m00s · attempt 1" in html
    # one marker per epoch in each loss series; no lr in these metrics, so no lr chart points
    assert points(html, "train_loss") == ["1", "2", "3", "4"]
    assert points(html, "val_loss") == ["1", "2", "3", "4"]
    assert "stage 1 learning rate: no values yet" in html
    assert "newest committed checkpoint: <b>step-00000040</b>" in html
    assert "not verified yet" in html and "not evaluated yet" in html
    assert 'http-equiv="Content-Security-Policy" content="default-src \'none\'' in html
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing but data: URLs to load


def test_strings_from_the_run_folder_show_as_text_never_as_markup(tmp_path):
    files = crafted_run("failed", error=EVIL, stage_name=EVIL, stage=1)
    files["config.json"] = json.dumps({"monitor": {"heartbeat_seconds": 30}, "note": EVIL}).encode()
    files["logs/attempt-001.jsonl"] = (json.dumps({"event": "train failed", "level": "error", "error": EVIL,
                                                   "timestamp": "2026-01-01T00:00:00Z", "exit_code": 1}) + "\n").encode()
    files["eval/report.md"] = f"# Evaluation {EVIL}\n\n| metric | model |\n|---|---|\n| {EVIL} | 1 |\n".encode()
    files["verify/report.json"] = json.dumps({"passed": False, "checks": [{"name": EVIL, "passed": False,
                                                                          "detail": EVIL}]}).encode()
    html = page(write_run(tmp_path, files))
    assert "<script>alert" not in html
    assert html.count("&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;") >= 6  # error, stage, config, log, eval, verify
    assert "<script>" in html  # the page's own script is still there, once after the data
    assert html.count("<script") == 2


def test_a_run_folder_with_missing_truncated_and_wrong_typed_files_gives_a_page_that_says_so(tmp_path):
    files = crafted_run("running")
    files["progress.json"] = files["progress.json"][:40]  # a write cut short
    files["config.json"] = b'["not", "an", "object"]'
    files["metrics.jsonl"] += b'{"epoch": 4, "train_lo'
    files["samples/index.json"] = b'{"videos": "none"}'
    files["predictions/index.json"] = json.dumps({"videos": [{"png": "gone.png", "class": "linear"}]}).encode()
    files["verify/report.json"] = b'"passed"'
    files["stage2/metrics.jsonl"] = json.dumps({"epoch": 1, "train_loss": "high", "lr": None}).encode() + b"\n"
    html = page(write_run(tmp_path, files))
    notes = re.search(r'<section id="notes">(.*?)</section>', html).group(1)
    assert "progress.json is not valid JSON" in notes
    assert "config.json holds a list, not an object" in notes
    assert "1 line(s) of metrics.jsonl are not valid JSON" in notes
    assert "samples/index.json lists no videos" in notes
    assert "predictions/gone.png is missing" in notes
    assert "unknown: no readable progress.json" in html
    assert points(html, "val_loss") == ["1", "2", "3"]  # the readable epochs still drawn
    assert "stage 2 loss: no values yet" in html  # a loss that is not a number is not drawn
    assert "not verified yet" in html


def test_an_empty_folder_still_gives_a_page(tmp_path):
    html = page(tmp_path)
    assert "unknown: no readable progress.json" in html and "no epoch finished yet" in html


def test_status_html_writes_the_page_and_keeps_its_exit_code(tmp_path, capsys):
    run = write_run(tmp_path / "run", crafted_run("running", heartbeat_age=100, heartbeat_seconds=30))
    target = tmp_path / "page.html"
    code, out = status(capsys, str(run), "--html", str(target))
    assert code == 1 and "STALE" in out  # status says what it always said
    html = target.read_text()
    assert "running · epoch 3/10" in html and f"MAGVIT run {run}" in html


def test_status_html_writes_nothing_for_no_such_run(tmp_path, capsys):
    code, out = status(capsys, str(tmp_path / "nothing"), "--html", str(tmp_path / "page.html"))
    assert code == 2 and "no such run" in out
    assert not (tmp_path / "page.html").exists()


def test_the_page_writer_draws_on_its_own_thread_at_most_every_min_seconds(tmp_path):
    write_run(tmp_path, crafted_run("running"))
    pages: list[tuple[str, str]] = []
    writer = PageWriter(LocalFolder(tmp_path), "run", lambda html: pages.append((threading.current_thread().name, html)),
                        min_seconds=0.5)
    with writer:
        started = time.monotonic()
        while time.monotonic() - started < 1.2:
            writer.request()  # as often as a fast training loop rewrites progress.json
            time.sleep(0.01)
    assert 2 <= len(pages) <= 4  # about 1.2 s / 0.5 s, not a hundred
    assert {name for name, _ in pages} == {"page"}  # never the requesting thread
    writer.write_now()
    assert pages[-1][0] == threading.current_thread().name and "running · epoch 3/10" in pages[-1][1]


def log_lines(*records: dict) -> bytes:
    return "".join(json.dumps({"timestamp": "2026-01-01T00:00:00Z", "level": "info", **r}) + "\n" for r in records).encode()


def test_the_attempts_say_where_each_resumed_from_and_how_it_ended(tmp_path):
    files = crafted_run("preempted", attempt=3, error="stopped by SIGTERM at step 30")
    files["logs/attempt-001.jsonl"] = log_lines({"event": "train.fresh_start", "stage": 1}) + b'{"event": "train.pro'
    files["logs/attempt-002.jsonl"] = log_lines(
        {"event": "train.resumed", "stage": 1, "checkpoint": "step-00000010", "step": 10},
        {"event": "train failed", "level": "error", "error": "NaN loss", "exit_code": 1},
    )
    files["logs/attempt-003.jsonl"] = log_lines({"event": "train.resumed", "stage": 1, "checkpoint": "step-00000020",
                                                  "step": 20})
    html = page(write_run(tmp_path, files))
    rows = re.findall(r"<tr><td>(\d)</td><td>[^<]*</td><td>([^<]*)</td><td[^>]*>([^<]*)</td></tr>", html)
    assert rows == [
        ("1", "stage 1: fresh start", "no end recorded: killed (kill -9, a crash, a lost machine)"),
        ("2", "stage 1: from step-00000010 (step 10)", "train failed: NaN loss (exit 1)"),
        ("3", "stage 1: from step-00000020 (step 20)", "preempted (progress.json): stopped by SIGTERM at step 30"),
    ]


def test_a_progress_json_of_wrong_types_still_gives_a_page(tmp_path):
    files = crafted_run("running")
    files["progress.json"] = json.dumps({"status": ["running"], "heartbeat_at": 7, "loss": "low", "step": "ten",
                                         "total_steps": 0, "stage": "two", "attempt": None}).encode()
    html = page(write_run(tmp_path, files))
    assert "[&#x27;running&#x27;] · stage two/? (-) · epoch None/None · step ten/0 · attempt None" in html
    assert '"live": false' in html  # not a status the job writes: nothing to age in the page
