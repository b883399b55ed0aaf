"""`status` (job.modes.status, SPEC §9) in process: what it says about crafted run folders, local
and in a bucket."""

from __future__ import annotations

import json

import pytest

from tests.crafted_runs import crafted_run, damage, status, write_run

pytestmark = pytest.mark.timeout(120)


def status_json(capsys, uri: str) -> tuple[int, dict]:
    code, out = status(capsys, uri, "--json")
    return code, json.loads(out)


def test_a_run_in_stage_2_shows_the_stage_and_its_checkpoints_and_losses(tmp_path, capsys):
    stage1 = crafted_run("running", val_losses=(0.3, 0.2, 0.1))
    stage2 = crafted_run("running", val_losses=(4.0, 3.5), stage=2, stages=2, stage_name="transformer")
    files = {**stage1, "progress.json": stage2["progress.json"]}
    files |= {f"stage2/{rel}": data for rel, data in stage2.items() if rel.startswith(("checkpoints/", "metrics"))}
    code, out = status(capsys, str(write_run(tmp_path, files)))
    assert code == 0, out
    assert "stage:           2/2 (transformer)" in out
    assert "step-00000020, the newest committed one" in out  # stage 2's, not stage 1's step-00000030
    assert "3.50000" in out and "0.10000" not in out  # stage 2's loss trend


def test_running_with_a_fresh_heartbeat_is_healthy(tmp_path, capsys):
    code, out = status(capsys, str(write_run(tmp_path, crafted_run("running", heartbeat_age=2))))
    assert code == 0, out
    assert "STALE" not in out
    assert "health:          healthy (exit 0)" in out
    assert "step-00000030, the newest committed one" in out


@pytest.mark.parametrize("run_status", ["running", "starting"])
def test_a_heartbeat_older_than_three_intervals_is_stale(tmp_path, capsys, run_status):
    run = write_run(tmp_path, crafted_run(run_status, heartbeat_age=100, heartbeat_seconds=30))
    code, out = status(capsys, str(run))
    assert code == 1, out
    assert "!!! STALE" in out
    assert "has not beaten for 1m4" in out  # 100 s, give or take the timestamps' whole seconds


@pytest.mark.parametrize(
    "heartbeat_seconds, heartbeat_age, stale",
    [(2.0, 10, True), (2.0, 3, False), (None, 60, False), (None, 100, True)],
    ids=["interval-from-config-stale", "interval-from-config-fresh", "default-30s-fresh", "default-30s-stale"],
)
def test_the_stale_limit_is_three_heartbeat_intervals_from_config_json(
    tmp_path, capsys, heartbeat_seconds, heartbeat_age, stale
):
    run = write_run(tmp_path, crafted_run("running", heartbeat_age=heartbeat_age, heartbeat_seconds=heartbeat_seconds))
    code, report = status_json(capsys, str(run))
    assert report["stale"] is stale
    assert report["stale_after_seconds"] == 3 * (heartbeat_seconds or 30)
    assert code == (1 if stale else 0)


@pytest.mark.parametrize("run_status", ["failed", "stalled"])
def test_failed_and_stalled_runs_exit_1_and_show_their_error(tmp_path, capsys, run_status):
    run = write_run(tmp_path, crafted_run(run_status, heartbeat_age=5, error="no training step for 900 s"))
    code, out = status(capsys, str(run))
    assert code == 1, out
    assert f"!!! {run_status.upper()}: no training step for 900 s" in out


def test_a_preempted_run_is_not_healthy_and_says_why(tmp_path, capsys):
    code, out = status(capsys, str(write_run(tmp_path, crafted_run("preempted"))))
    assert code == 1, out
    assert "PREEMPTED" in out and "SIGTERM" in out and "restart" in out


@pytest.mark.parametrize("where", ["missing folder", "empty folder"])
def test_no_such_run_exits_2(tmp_path, capsys, where):
    uri = tmp_path / "nothing-here"
    if where == "empty folder":
        uri.mkdir()
    code, out = status(capsys, str(uri))
    assert code == 2
    assert "no such run" in out


def test_a_corrupt_progress_json_is_reported_not_a_crash(tmp_path, capsys):
    run = write_run(tmp_path, crafted_run() | {"progress.json": b'{"status": "runn'})
    code, out = status(capsys, str(run))
    assert code == 1
    assert "progress.json is not valid JSON" in out
    assert "step-00000030, the newest committed one" in out  # the rest of the folder still speaks


@pytest.mark.parametrize("as_json", [False, True])
def test_progress_fields_of_the_wrong_type_show_what_they_can(tmp_path, capsys, as_json):
    odd = {"loss": "NaN", "eta_seconds": "soon", "samples_per_second": [1], "step": "7", "total_steps": "many",
           "epoch": None, "stage": "two", "error": 42, "heartbeat_at": 1234}
    run = write_run(tmp_path, crafted_run("failed", **odd))
    code, out = status(capsys, str(run), *(["--json"] if as_json else []))
    assert code == 1, out
    if as_json:
        assert json.loads(out)["eta_seconds"] == "soon"
    else:
        assert "loss:            'NaN'" in out and "eta:             'soon'" in out
        assert "!!! FAILED: 42" in out and "step-00000030, the newest committed one" in out


@pytest.mark.parametrize("ahead, skew", [(0, False), (3, False), (120, True)])
def test_a_heartbeat_a_few_seconds_ahead_is_not_clock_skew(tmp_path, capsys, ahead, skew):
    run = write_run(tmp_path, crafted_run("running", heartbeat_age=-ahead))
    code, out = status(capsys, str(run))
    assert code == 0, out
    assert ("clock skew" in out) is skew, out
    if not skew:
        assert "heartbeat age:   0m00s old" in out


def test_json_has_the_raw_progress_fields_and_the_derived_ones(tmp_path, capsys):
    files = crafted_run("running", heartbeat_age=3)
    code, report = status_json(capsys, str(write_run(tmp_path, files)))
    assert code == 0
    assert json.loads(files["progress.json"]).items() <= report.items()
    assert report["health"] == "healthy" and report["stale"] is False
    assert 2 <= report["heartbeat_age_seconds"] < 30
    assert report["newest_checkpoint"] | {"verify": None} == {
        "name": "step-00000030", "folder": "checkpoints/step-00000030", "step": 30, "epoch": 3,
        "created_at": report["newest_checkpoint"]["created_at"], "committed": True, "sizes_match": True, "verify": None,
    }
    assert report["latest"] == {"checkpoint": "step-00000030", "step": 30}
    assert [r["val_loss"] for r in report["loss_trend"]["recent"]] == [0.3, 0.2, 0.1]
    assert report["loss_trend"]["val_improving"] is True


def test_a_rising_val_loss_is_not_improving(tmp_path, capsys):
    run = write_run(tmp_path, crafted_run(val_losses=(0.1, 0.2, 0.3)))
    _, out = status(capsys, str(run))
    assert "val_loss NOT improving over the last 3 epoch(s); best 0.10000 at epoch 1" in out


@pytest.mark.parametrize(
    "how, says", [("missing file", "missing"), ("wrong size", "bytes"), ("no manifest", "not committed"),
                  ("names a file outside", "not a plain file of its folder")],
)
def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(tmp_path, capsys, how, says):
    run = write_run(tmp_path, damage(crafted_run(), how))
    _, report = status_json(capsys, str(run))
    assert report["newest_checkpoint"]["name"] == "step-00000020"
    assert any("step-00000030" in note and says in note for note in report["notes"]), report["notes"]


@pytest.mark.parametrize(
    "verify_report, says",
    [
        ({"passed": True, "checks": [{"name": "hashes", "passed": True, "detail": "step-00000030 ok"}]},
         "verify passed"),
        ({"passed": True, "checks": [{"name": "hashes", "passed": True, "detail": "step-00000020 ok"}]},
         "verify passed, but for older checkpoints only"),
        ({"passed": False, "checks": [{"name": "finite output", "passed": False, "detail": "NaN"}]},
         "verify FAILED (finite output)"),
    ],
    ids=["covers-newest", "older-only", "failed"],
)
def test_the_verify_report_is_shown_with_the_newest_checkpoint(tmp_path, capsys, verify_report, says):
    run = write_run(tmp_path, crafted_run() | {"verify/report.json": json.dumps(verify_report).encode()})
    _, out = status(capsys, str(run))
    assert f"committed, sizes match; {says}" in out


def test_the_run_uri_can_come_from_the_option_or_the_environment(tmp_path, capsys, monkeypatch):
    run = str(write_run(tmp_path, crafted_run("completed")))
    assert status(capsys, "--run-uri", run)[0] == 0
    monkeypatch.setenv("JOB_RUN_URI", run)
    assert status(capsys)[0] == 0
