"""`python -m job status RUN_URI` (SPEC §9): what it says about crafted and real run folders,
local and in a bucket, and that it stays light (no torch) and fast."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from job.cli import main
from tests.helpers import ROOT, free_port, job_command, job_env, run_job

pytestmark = pytest.mark.timeout(120)


# --- crafted run folders: files we write, with timestamps we control ---------------------


def ago(seconds: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(seconds=seconds)).isoformat(timespec="seconds")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_files(step: int, epoch: int) -> dict[str, bytes]:
    """A committed checkpoint: its files, then a manifest with their sizes and hashes."""
    folder = f"checkpoints/{checkpoint_name(step)}"
    files = {"model.safetensors": os.urandom(1000 + step), "state.json": json.dumps({"step": step}).encode()}
    manifest = {
        "files": {name: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for name, d in files.items()},
        "step": step, "epoch": epoch, "created_at": ago(60), "format": 1,
    }
    return {f"{folder}/{name}": data for name, data in files.items()} | {
        f"{folder}/manifest.json": json.dumps(manifest).encode()
    }


def crafted_run(
    status: str = "running", heartbeat_age: float = 2.0, heartbeat_seconds: float | None = 30.0,
    val_losses: tuple[float, ...] = (0.3, 0.2, 0.1), **progress_fields,
) -> dict[str, bytes]:
    """The files of a run folder with one checkpoint and one metrics line per epoch."""
    steps = [10 * epoch for epoch in range(1, len(val_losses) + 1)]
    progress = {
        "status": status, "mode": "train", "epoch": len(val_losses), "epochs": 10, "step": steps[-1],
        "total_steps": 100, "loss": 0.5, "samples_per_second": 12.5, "eta_seconds": 600,
        "started_at": ago(3600), "updated_at": ago(heartbeat_age), "heartbeat_at": ago(heartbeat_age),
        "attempt": 1, "last_checkpoint": checkpoint_name(steps[-1]), **progress_fields,
    }
    metrics = [
        {"epoch": epoch, "step": step, "train_loss": val + 0.05, "val_loss": val}
        for epoch, (step, val) in enumerate(zip(steps, val_losses), start=1)
    ]
    files = {
        "progress.json": json.dumps(progress).encode(),
        "metrics.jsonl": "".join(json.dumps(m) + "\n" for m in metrics).encode(),
        "checkpoints/latest.json": json.dumps({"checkpoint": checkpoint_name(steps[-1]), "step": steps[-1]}).encode(),
    }
    if heartbeat_seconds is not None:
        files["config.json"] = json.dumps({"monitor": {"heartbeat_seconds": heartbeat_seconds}}).encode()
    for epoch, step in enumerate(steps, start=1):
        files |= checkpoint_files(step, epoch)
    return files


def write_run(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def status(capsys, *args: str) -> tuple[int, str]:
    """``python -m job status ARGS`` in this process (fast); returns exit code and stdout."""
    code = main(["status", *args])
    return code, capsys.readouterr().out


def status_json(capsys, uri: str) -> tuple[int, dict]:
    code, out = status(capsys, uri, "--json")
    return code, json.loads(out)


def status_process(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    started = time.monotonic()
    result = run_job("status", *args, env=env, timeout=timeout)
    result.seconds = time.monotonic() - started
    assert "Traceback" not in result.stderr, result.stderr
    return result


# --- what it says -----------------------------------------------------------------------


def test_completed_real_run_exits_0_and_names_its_newest_checkpoint(smoke_baseline):
    # The run ended in stage 2: status shows that stage and its newest checkpoint.
    newest = json.loads((smoke_baseline / "stage2" / "checkpoints" / "latest.json").read_text())["checkpoint"]
    result = status_process(str(smoke_baseline))
    print(f"status of a local smoke run: {result.seconds:.2f} s")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "completed" in result.stdout and "stage:           2/2 (transformer)" in result.stdout
    assert f"{newest}, the newest committed one" in result.stdout
    assert "committed, sizes match" in result.stdout
    assert "loss trend" in result.stdout


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


def damage(files: dict[str, bytes], how: str) -> dict[str, bytes]:
    """The newest checkpoint (step 30) made uncommitted in one of the ways a crash or a
    half-finished upload leaves it."""
    folder = "checkpoints/step-00000030"
    if how == "missing file":
        return {rel: data for rel, data in files.items() if rel != f"{folder}/model.safetensors"}
    if how == "wrong size":
        return files | {f"{folder}/model.safetensors": b"truncated"}
    if how == "names a file outside":
        manifest = json.loads(files[f"{folder}/manifest.json"])
        manifest["files"]["../step-00000020/model.safetensors"] = manifest["files"]["model.safetensors"]
        return files | {f"{folder}/manifest.json": json.dumps(manifest).encode()}
    return {rel: data for rel, data in files.items() if rel != f"{folder}/manifest.json"}


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


def test_help_lists_status():
    result = run_job("--help")
    assert result.returncode == 0
    assert "status" in result.stdout


# --- watching ----------------------------------------------------------------------------


def test_watch_ends_by_itself_on_a_completed_run(smoke_baseline):
    result = status_process(str(smoke_baseline), "--watch", "0.2", timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "completed" in result.stdout


def watching(run: Path, *args: str, sigint_ignored: bool = False) -> subprocess.Popen:
    """``status --watch 0.2`` in the background, once it has printed its first report;
    ``sigint_ignored``: started as a shell starts a background command (SIGINT ignored)."""
    proc = subprocess.Popen(
        job_command("status", str(run), "--watch", "0.2", *args), cwd=ROOT, env=job_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None,
    )
    assert proc.stdout.readline().startswith("run:")
    return proc


def test_watch_follows_the_run_until_it_fails(tmp_path):
    run = write_run(tmp_path, crafted_run("running"))
    proc = watching(run)
    write_run(run, {"progress.json": crafted_run("failed", error="RuntimeError: boom")["progress.json"]})
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, out + err
    assert "!!! FAILED: RuntimeError: boom" in out
    assert "Traceback" not in err


@pytest.mark.parametrize("sigint_ignored", [False, True])
def test_ctrl_c_ends_a_watch_cleanly(tmp_path, sigint_ignored):
    proc = watching(write_run(tmp_path, crafted_run("running")), sigint_ignored=sigint_ignored)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + err
    assert "Traceback" not in err


# --- in a bucket ----------------------------------------------------------------------------


def upload_run(s3, prefix: str, files: dict[str, bytes]) -> str:
    for rel, data in files.items():
        s3.put(f"{prefix}/{rel}", data)
    return s3.uri(prefix)


SAME_ANSWER = ("health", "stale", "status", "step", "newest_checkpoint", "latest", "loss_trend", "notes", "exit_code")


@pytest.mark.parametrize(
    "make_files, exit_code",
    [  # built when the test runs: heartbeat ages are relative to now
        (lambda: crafted_run("running", heartbeat_age=2), 0),
        (lambda: crafted_run("running", heartbeat_age=600), 1),
        (lambda: damage(crafted_run("completed"), "wrong size"), 0),
        (lambda: {}, 2),
    ],
    ids=["fresh", "stale", "completed-with-damaged-newest", "no-such-run"],
)
def test_a_run_in_a_bucket_gets_the_same_answer_as_on_disk(s3, tmp_path, make_files, exit_code):
    files = make_files()
    local = write_run(tmp_path, files)
    remote = upload_run(s3, "runs/crafted", files)
    on_disk, in_bucket = status_process(str(local), "--json"), status_process(remote, "--json")
    print(f"status of a crafted s3 run: {in_bucket.seconds:.2f} s")
    assert (on_disk.returncode, in_bucket.returncode) == (exit_code, exit_code), in_bucket.stdout + in_bucket.stderr
    expected, got = json.loads(on_disk.stdout), json.loads(in_bucket.stdout)
    assert {k: got.get(k) for k in SAME_ANSWER} == {k: expected.get(k) for k in SAME_ANSWER}


def test_a_real_run_in_a_bucket(s3, smoke_baseline):
    files = {
        str(path.relative_to(smoke_baseline)): path.read_bytes()
        for path in smoke_baseline.rglob("*")
        if path.is_file() and path.relative_to(smoke_baseline).parts[0] not in ("data", "logs")
    }
    remote = upload_run(s3, "runs/smoke", files)
    on_disk, in_bucket = status_process(str(smoke_baseline), "--json"), status_process(remote, "--json")
    print(f"status of a smoke run in s3: {in_bucket.seconds:.2f} s")
    assert in_bucket.returncode == 0, in_bucket.stdout + in_bucket.stderr
    expected, got = json.loads(on_disk.stdout), json.loads(in_bucket.stdout)
    assert {k: got.get(k) for k in SAME_ANSWER} == {k: expected.get(k) for k in SAME_ANSWER}
    text = status_process(remote)
    assert "completed" in text.stdout and f"{expected['newest_checkpoint']['name']}, the newest" in text.stdout


@pytest.mark.parametrize("busy_answers, exit_code", [(3, 0), (100, 2)])
def test_a_busy_store_is_asked_again_briefly_before_status_says_unreachable(
    s3, faulty_store, monkeypatch, capsys, busy_answers, exit_code
):
    remote = upload_run(s3, "runs/busy", crafted_run("running", heartbeat_age=2))
    monkeypatch.setenv("AWS_ENDPOINT_URL", faulty_store.url)
    faulty_store.fail_next(busy_answers, 503, "SlowDown", "Please reduce your request rate.")
    code, out = status(capsys, remote)
    assert code == exit_code, out
    if exit_code == 2:
        assert out.startswith(f"{remote}: unreachable:") and "reduce your request rate" in out, out
        assert faulty_store.requests >= 2  # asked again before giving up


def test_an_unreachable_endpoint_exits_2_quickly():
    env = job_env(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
    )
    result = status_process("s3://no-bucket/run", env=env, timeout=60)
    print(f"status of an unreachable endpoint: {result.seconds:.2f} s")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "unreachable:" in result.stdout
    assert result.seconds < 30


class SilentEndpoint:
    """A TCP port that accepts connections and never answers: a store that hangs mid-request."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.connected = threading.Event()
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:  # closed
                return
            self._held.append(connection)
            self.connected.set()

    def close(self) -> None:
        self.server.close()
        for connection in self._held:
            connection.close()


def test_ctrl_c_ends_a_watch_whose_store_hangs_mid_request():
    """A Ctrl-C that lands inside a request is not taken for a failure of the store and retried:
    the watch ends (exit 0) at once."""
    endpoint = SilentEndpoint()
    env = job_env(
        AWS_ENDPOINT_URL=endpoint.url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    proc = subprocess.Popen(
        job_command("status", "s3://bucket/run", "--watch", "0.2"), cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert endpoint.connected.wait(60), "status never asked the store"
        time.sleep(0.5)  # inside its request, waiting for an answer that never comes
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, out + err
        assert "Traceback" not in err
    finally:
        proc.kill()
        proc.wait(timeout=10)
        endpoint.close()


# --- light and fast -------------------------------------------------------------------------

FORBID_HEAVY_IMPORTS = '''
import sys

class ForbidHeavyImports:
    """status must run on a laptop without torch or numpy installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "numpy"):
            raise ImportError(f"{name} is not installed here (test_status)")
        return None

sys.meta_path.insert(0, ForbidHeavyImports())
'''


def test_status_imports_no_torch_or_numpy(tmp_path):
    # `python -m job status ...` with an import hook that makes torch and numpy uninstallable.
    guarded = FORBID_HEAVY_IMPORTS + "import runpy\nrunpy.run_module('job', run_name='__main__')\n"
    guard = subprocess.run([sys.executable, "-c", FORBID_HEAVY_IMPORTS + "import torch"], capture_output=True, text=True)
    assert guard.returncode != 0 and "not installed here" in guard.stderr  # the guard itself works

    for files, exit_code in ((crafted_run("running"), 0), (crafted_run("failed"), 1)):
        run = write_run(tmp_path / f"run-{exit_code}", files)
        for args in ((), ("--json",)):
            result = subprocess.run(
                [sys.executable, "-c", guarded, "status", str(run), *args],
                env=job_env(), capture_output=True, text=True, timeout=60,
            )
            assert result.returncode == exit_code, result.stdout + result.stderr
            assert "Traceback" not in result.stderr, result.stderr


def test_status_answers_fast_on_a_local_run(tmp_path):
    run = write_run(tmp_path, crafted_run("running"))
    result = status_process(str(run))
    print(f"status of a crafted local run: {result.seconds:.2f} s")
    assert result.returncode == 0
    assert result.seconds < 10
