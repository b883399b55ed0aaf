"""`python -m job status RUN_URI` (SPEC §9) as a process: real run folders, local and in a bucket,
--watch and Ctrl-C, a busy or unreachable store, and that it stays light (no torch) and fast."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from job.modes.status import read_run
from tests.crafted_runs import ago, crafted_run, damage, status, write_run
from tests.helpers import ROOT, free_port, job_command, job_env, run_job

pytestmark = pytest.mark.timeout(120)


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


# --- the store's clock, not the laptop's ----------------------------------------------------


def with_lease(files: dict[str, bytes], renewed_ago: float) -> dict[str, bytes]:
    """The run's files with the lease of a writer (60 s) that last renewed it ``renewed_ago`` s ago."""
    lease = {"holder": "h", "attempt": 1, "host": "gpu-1", "pid": 7, "acquired_at": ago(3600),
             "renewed_at": ago(renewed_ago), "expires_at": ago(renewed_ago - 60), "ttl_seconds": 60, "released_at": None}
    return files | {"lease.json": json.dumps(lease).encode()}


def live_and_dead_runs(s3) -> tuple[str, str]:
    """A run beating 2 s ago, and one SIGKILLed 200 s ago (stale after 90 s, lease expired)."""
    live = upload_run(s3, "runs/live", with_lease(crafted_run("running", heartbeat_age=2), renewed_ago=2))
    dead = upload_run(s3, "runs/dead", with_lease(crafted_run("running", heartbeat_age=200), renewed_ago=200))
    return live, dead


@pytest.mark.parametrize("laptop_minutes", [-10, 0, 10])
def test_a_laptop_clock_minutes_off_gives_the_same_verdict_and_says_so(s3, laptop_minutes):
    live, dead = live_and_dead_runs(s3)
    off = timedelta(minutes=laptop_minutes)

    def laptop() -> datetime:
        return datetime.now(timezone.utc) + off

    verdicts = {uri: read_run(uri, clock=laptop) for uri in (live, dead)}
    assert [(r.health, r.exit_code, r.writer["state"]) for r in verdicts.values()] == [
        ("healthy", 0, "holding"), ("stale", 1, "expired")]
    for report in verdicts.values():
        assert abs(report.clock_skew - off.total_seconds()) < 5
        said = " ".join(note for note in report.notes if "clock" in note)
        if laptop_minutes:  # 10 minutes, give or take the Date header's whole second and the answer's way back
            direction = "ahead of" if laptop_minutes > 0 else "behind"
            assert re.search(rf"this machine's clock is (9m5\d|10m0\d)s {direction} the store's; heartbeat age and "
                             "lease expiry are measured by the store's clock", said), said
        else:
            assert not said


@pytest.mark.skipif(shutil.which("faketime") is None, reason="needs faketime (apt-get install faketime, as .ci/run does)")
def test_status_on_a_laptop_whose_clock_is_ten_minutes_fast_or_slow(s3):
    live, dead = live_and_dead_runs(s3)
    env = job_env(FAKETIME_DONT_FAKE_MONOTONIC="1")  # the wall clock is off, as a laptop's would be
    # What a wrong clock got wrong: a live run called stale by a fast clock, a dead one healthy by a slow one.
    for offset, uri, exit_code in (("+10m", live, 0), ("-10m", dead, 1)):
        result = subprocess.run(["faketime", "-f", offset, *job_command("status", uri)], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == exit_code, (offset, result.stdout, result.stderr)
        assert re.search(r"this machine's clock is (9m5\d|10m0\d)s", result.stdout), result.stdout


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
