"""The built image, run for real (issue 14). tests/drills/container/drill.sh builds the image and runs
this file with DRILL_IMAGE set; without it (as in `make test`) every test here is skipped.

Each container runs with --network host, so that it reaches moto's S3 server on 127.0.0.1 (the
tests' own `s3` fixture), under the image's defaults (uid 10001, tini, the entrypoint). A new
container starts with an empty cache: what it resumes from is in the bucket."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import ROOT, run_job

IMAGE = os.environ.get("DRILL_IMAGE", "")
DOCKER = os.environ.get("DRILL_DOCKER") or shutil.which("docker") or "docker"
LABEL = os.environ.get("DRILL_LABEL", "magvit-drill")
# The stop timeout docs/deploy.md documents (docker run --stop-timeout, compose
# stop_grace_period, k8s terminationGracePeriodSeconds).
STOP_TIMEOUT = 30
UID = 10001

pytestmark = [
    pytest.mark.image,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not IMAGE, reason="the image drill: make image-test (tests/drills/container/drill.sh)"),
]


# --- helpers -----------------------------------------------------------------------------


def docker(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


class Containers:
    """Starts containers of the image against one bucket; removes them all at the end."""

    def __init__(self, s3):
        self.s3 = s3
        self.names: list[str] = []

    def args(self, name: str, *options: str, preset: str = "smoke") -> list[str]:
        env = {"JOB_PRESET": preset, "JOB_RUN_URI": self.s3.uri(), **self.s3.env}
        flags = [f"--name={name}", f"--label={LABEL}", "--network=host"]
        for key, value in env.items():
            flags += ["-e", f"{key}={value}"]
        return [*flags, *options]

    def name(self) -> str:
        name = f"drill-{uuid.uuid4().hex[:10]}"
        self.names.append(name)
        return name

    def run(self, *cmd: str, options: tuple[str, ...] = (), timeout: float = 300) -> subprocess.CompletedProcess:
        """docker run in the foreground; returns exit code and output."""
        name = self.name()
        return docker("run", *self.args(name, *options), IMAGE, *cmd, timeout=timeout, check=False)

    def start(self, *cmd: str, options: tuple[str, ...] = ()) -> str:
        name = self.name()
        docker("run", "-d", *self.args(name, *options), IMAGE, *cmd)
        return name

    def remove(self) -> None:
        for name in self.names:
            docker("rm", "-f", name, check=False, timeout=60)


@pytest.fixture
def containers(s3):
    c = Containers(s3)
    yield c
    c.remove()


def state(name: str) -> dict:
    return json.loads(docker("inspect", "-f", "{{json .State}}", name).stdout)


def logs(name: str) -> str:
    result = docker("logs", name, check=False)
    return result.stdout + result.stderr


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(interval)


def wait_exit(name: str, timeout: float = 300) -> int:
    wait_for(lambda: state(name)["Status"] == "exited", timeout, f"{name} to exit", interval=0.5)
    return state(name)["ExitCode"]


def checkpoint_in_bucket(s3) -> bool:
    return "run/checkpoints/latest.json" in s3.keys("run/checkpoints/")


def job_pid(name: str) -> int:
    """The host pid of the job's python: the child of tini (the container's pid 1)."""
    tini = state(name)["Pid"]
    children = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"\nPPid:\t{tini}\n" in (entry / "status").read_text():
                children.append(int(entry.name))
        except OSError:
            continue
    assert len(children) == 1, f"tini (pid {tini}) has children {children}"
    return children[0]


def uids(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError("no Uid line")


def final_sha(s3) -> str:
    latest = json.loads(s3.get("run/checkpoints/latest.json"))
    return hashlib.sha256(s3.get(f"run/checkpoints/{latest['checkpoint']}/model.safetensors")).hexdigest()


def non_json_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip() and not line.startswith("{")]


@pytest.fixture(scope="module")
def uninterrupted(s3_endpoint):
    """sha256 of the final model of one uninterrupted smoke run in a container."""
    from tests.helpers import S3Bucket

    bucket = S3Bucket(s3_endpoint, f"drill-{uuid.uuid4().hex[:10]}")
    c = Containers(bucket)
    try:
        result = c.run("train")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return final_sha(bucket)
    finally:
        c.remove()


# --- the drill -----------------------------------------------------------------------------


def test_smoke_train_verify_evaluate_in_containers_and_status_from_the_host(containers, s3, uninterrupted):
    for mode in ("train", "verify", "evaluate"):
        started = time.monotonic()
        result = containers.run(mode)
        print(f"{mode}: exit {result.returncode} in {time.monotonic() - started:.1f} s")
        assert result.returncode == 0, f"{mode}\n" + result.stdout[-3000:] + result.stderr[-3000:]
        output = result.stdout + result.stderr
        assert "Matplotlib" not in output and "font cache" not in output, mode
        if mode == "train":  # only JSON log lines (verify and evaluate also print a table)
            assert non_json_lines(output) == [], mode
    keys = s3.keys("run/")
    assert "run/verify/report.json" in keys and any(k.startswith("run/eval/") for k in keys)
    assert final_sha(s3) == uninterrupted, "two uninterrupted runs differ"
    # `status` from the host (the checkout's package, the venv's python) reads the bucket.
    status = run_job("status", s3.uri(), "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    report = json.loads(status.stdout)
    assert report["status"] == "completed" and report["health"] == "completed"


def test_docker_kill_then_a_new_container_read_only_with_an_empty_tmpfs_cache_resumes(
        containers, s3, uninterrupted):
    # Both containers as the Kubernetes Job runs them: read-only root filesystem, tmpfs for the
    # cache, /work and /tmp, no capabilities, no privilege escalation.
    locked = ("--read-only", f"--tmpfs=/cache:rw,uid={UID},gid={UID},mode=0750",
              f"--tmpfs=/work:rw,uid={UID},gid={UID},mode=0750", "--tmpfs=/tmp:rw,mode=1777",
              "--cap-drop=ALL", "--security-opt=no-new-privileges")
    # --restart on-failure too: `docker kill` is a manual stop, which Docker does not restart.
    first = containers.start("train", options=(*locked, "--restart=on-failure"))
    wait_for(lambda: checkpoint_in_bucket(s3) or state(first)["Status"] != "running", 180,
             "a checkpoint in the bucket")
    assert state(first)["Status"] == "running", logs(first)[-3000:]
    docker("kill", first)
    assert wait_exit(first, 60) == 137
    time.sleep(3)
    after = state(first)
    assert after["Status"] == "exited" and not after["Restarting"], after
    assert docker("inspect", "-f", "{{.RestartCount}}", first).stdout.strip() == "0"
    latest_before = json.loads(s3.get("run/checkpoints/latest.json"))

    result = containers.run("train", options=locked)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    resumed = [json.loads(line) for line in result.stdout.splitlines()
               if line.startswith("{") and '"train.resumed"' in line]
    assert resumed and resumed[0]["step"] >= latest_before["step"] > 0, result.stdout[-3000:]
    assert non_json_lines(result.stdout + result.stderr) == []
    assert final_sha(s3) == uninterrupted, "the resumed run's model differs from the uninterrupted run's"


def test_healthy_non_root_and_docker_stop_gives_143_and_preempted_within_the_stop_timeout(containers, s3):
    name = containers.start(
        "train", "--set", "train.epochs=400",
        options=(f"--stop-timeout={STOP_TIMEOUT}", "--health-interval=2s", "--health-start-period=60s"),
    )
    wait_for(lambda: state(name).get("Health", {}).get("Status") == "healthy" or state(name)["Status"] != "running",
             120, "the health check to pass")
    assert state(name)["Status"] == "running", logs(name)[-3000:]
    listed = docker("ps", "--filter", f"name={name}", "--format", "{{.Status}}").stdout
    assert "(healthy)" in listed, listed
    pid = job_pid(name)
    assert uids(pid) == [UID] * 4, "the job runs as uid 10001"
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:4] == [b"-m", b"job", b"train"]

    # docker stop while both cores are busy with other work, as on a loaded host.
    hogs = [subprocess.Popen(["python3", "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        started = time.monotonic()
        docker("stop", name, timeout=STOP_TIMEOUT + 30)  # uses the container's --stop-timeout
        took = time.monotonic() - started
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    print(f"docker stop took {took:.2f} s under load (stop timeout {STOP_TIMEOUT} s)")
    final = state(name)
    assert final["ExitCode"] == 143 and not final["OOMKilled"], logs(name)[-3000:]
    assert took < STOP_TIMEOUT
    progress = json.loads(s3.get("run/progress.json"))
    assert progress["status"] == "preempted" and progress["last_checkpoint"], progress
    assert '"signal.received"' in logs(name)


def test_restart_on_failure_after_a_sigkill_of_the_job_from_the_host_resumes_and_matches(
        containers, s3, uninterrupted):
    name = containers.start("train", options=("--restart=on-failure",))
    wait_for(lambda: checkpoint_in_bucket(s3) or state(name)["Status"] != "running", 180,
             "a checkpoint in the bucket")
    pid = job_pid(name)
    assert uids(pid)[0] == UID
    os.kill(pid, signal.SIGKILL)  # the process dies, not a manual stop: Docker restarts it
    wait_for(lambda: state(name)["Status"] == "exited" or docker(
        "inspect", "-f", "{{.RestartCount}}", name).stdout.strip() not in ("0", ""), 60, "a restart")
    assert wait_exit(name, 300) == 0, logs(name)[-3000:]
    restarts = int(docker("inspect", "-f", "{{.RestartCount}}", name).stdout)
    assert restarts == 1, f"{restarts} restarts"
    output = logs(name)
    assert '"train.resumed"' in output, output[-3000:]
    assert final_sha(s3) == uninterrupted, "the restarted run's model differs from the uninterrupted run's"


def test_the_test_image_has_the_cpu_torch_and_the_font_list_and_no_test_tools():
    result = docker("run", "--rm", f"--label={LABEL}", "--entrypoint", "python", IMAGE, "-c",
                    "import importlib.util as u, torch, glob; print(torch.__version__);"
                    "print(u.find_spec('pytest') is None, u.find_spec('moto') is None);"
                    "print(glob.glob('/opt/matplotlib/fontlist-*.json'))")
    version, no_tools, fontlists = result.stdout.splitlines()
    assert version == "2.13.0+cpu", "the drill's image should have the CPU wheel, not PyPI's CUDA torch"
    assert no_tools == "True True"
    assert fontlists.startswith("['/opt/matplotlib/fontlist-v")


def test_compose_file_is_accepted_by_docker_compose_v1(tmp_path):
    compose = shutil.which("docker-compose")
    if not compose:
        pytest.skip("docker-compose (v1) is not installed; drill.sh installs it")
    infra = tmp_path / "infra"
    infra.mkdir()
    shutil.copy(ROOT / "infra" / "compose.yaml", infra / "compose.yaml")
    for name in ("minio", "job"):
        shutil.copy(ROOT / "infra" / f"{name}.env.example", infra / f"{name}.env")
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")  # the build context must exist
    result = subprocess.run([compose, "-f", str(infra / "compose.yaml"), "config"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stop_grace_period: 30s" in result.stdout
