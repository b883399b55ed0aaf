"""Helpers the tests share: run the job as a user would (a separate process whose output a
thread collects, so that tests wait on its log lines, not on fixed sleeps), and a real S3
endpoint on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from job.config import build_config, steps_per_epoch
from job.monitoring.progress import Progress
from job.storage import Layout, LocalFolder, RunStore
from job.storage.lease import Machine

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "entrypoint.sh"
HANG_AT_STEP = ROOT / "tests" / "drills" / "hang_at_step.py"  # the job with a training step that never ends
SMOKE = build_config("smoke")
SMOKE_STEPS = SMOKE.train.epochs * steps_per_epoch(SMOKE)
SMOKE_STAGE2_STEPS = SMOKE.stage2.epochs * steps_per_epoch(SMOKE, SMOKE.stage2.batch_size)
TOKENIZER_ONLY = ("--set", "stage2.epochs=0")  # for tests about the machinery, not the stages
# Lines that say a train attempt is past its start and into training.
TRAINING = ('"train.progress"', '"train.resumed"', '"train.fresh_start"')


def job_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOB_")}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def worker_processes(module: str) -> set[int]:
    """PIDs of the helper processes (job.worker) running ``python -m <module>`` on this machine
    that this test process's jobs started: under pytest-xdist, the jobs of the other test worker
    start helpers of their own at any moment, told apart by the worker name their environment
    inherits."""
    xdist_worker = os.environ.get("PYTEST_XDIST_WORKER")
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or module.encode() not in (entry / "cmdline").read_bytes().split(b"\0"):
                continue
            if xdist_worker and f"PYTEST_XDIST_WORKER={xdist_worker}".encode() not in (
                    entry / "environ").read_bytes().split(b"\0"):
                continue
            found.add(int(entry.name))
        except OSError:
            continue
    return found


def assert_workers_end(module: str, before: set[int], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while worker_processes(module) - before:
        assert time.monotonic() < deadline, f"{module} process(es) {worker_processes(module) - before} outlived the job"
        time.sleep(0.1)


def job_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "job", *args]


def run_job(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m job ARGS`` to completion and return its exit code and output."""
    return subprocess.run(
        job_command(*args), cwd=ROOT, env=env or job_env(), capture_output=True, text=True, timeout=timeout
    )


class FakeClock:
    """A monotonic clock that moves only when a test says so (``clock.now += seconds``)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class JobProcess:
    """A process started as a user would, whose output a thread collects line by line, so that
    a test waits for what the job says (``wait_for``) instead of sleeping a fixed time."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT):
        self.proc = subprocess.Popen(
            command, cwd=cwd, env=env or job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        self._ended = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    def job(cls, *args: str, env: dict[str, str] | None = None) -> "JobProcess":
        return cls(job_command(*args), env=env)

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for(self, *needles: str, timeout: float, times: int = 1) -> bool:
        """Wait until ``times`` lines hold one of ``needles`` (True) or the output ends first
        (False); fail the test after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                if sum(any(n in line for n in needles) for line in self.lines) >= times:
                    return True
                if self._ended:
                    return False
                left = deadline - time.monotonic()
                assert left > 0, f"none of {needles} within {timeout} s; last output:\n{self.output[-3000:]}"
                self._changed.wait(left)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(5)
        return code

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def poll(self) -> int | None:
        return self.proc.poll()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def events(self, name: str | None = None) -> list[dict]:
        return [e for e in log_events(self.output) if name is None or e["event"] == name]


def poll_until(predicate, timeout: float, what: str, every: float = 0.1) -> None:
    """For a state outside any process's output (a bucket, a file): check it every ``every``
    seconds, and fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def final_model(run: Path) -> Path:
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    return run / "checkpoints" / latest["checkpoint"] / "model.safetensors"


def checkpoint_state(folder: Path) -> dict:
    """The JSON state a checkpoint folder holds (in state.safetensors' metadata)."""
    from job.checkpoints.format import STATE_FILE, decode_state

    return decode_state((folder / STATE_FILE).read_bytes())[2]


def rewrite_state(folder: Path, state: dict, **manifest_fields: int) -> None:
    """Replace a checkpoint's JSON state (its tensors kept) and make the manifest match, with
    ``manifest_fields`` set too: a checkpoint whose hashes hold, with other content."""
    from job.checkpoints.format import STATE_FILE, decode_state, encode_state

    optimizer, rng, _ = decode_state((folder / STATE_FILE).read_bytes())
    data = encode_state(optimizer, rng, json.dumps(state).encode())
    (folder / STATE_FILE).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][STATE_FILE] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest.update(manifest_fields)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def log_events(output: str) -> list[dict]:
    """The JSON log records in a process's stdout."""
    events = []
    for line in output.splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


# --- a real S3 endpoint on 127.0.0.1 --------------------------------------------------------

FAKE_SECRET = "TESTSECRETdoNotLeak0123456789abcdefXYZ"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Endpoint:
    """moto's S3 server on a free local port, which a test can take away and bring back
    (moto keeps the buckets in this process, so they survive a restart)."""

    def __init__(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.start()

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


class S3Bucket:
    """A fresh bucket for one test, with the environment a job process needs to reach it."""

    def __init__(self, endpoint: S3Endpoint, name: str):
        import boto3

        self.endpoint, self.name = endpoint, name
        self.env = {
            "AWS_ENDPOINT_URL": endpoint.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self.client = boto3.client(
            "s3", endpoint_url=endpoint.url, aws_access_key_id="testing",
            aws_secret_access_key=FAKE_SECRET, region_name="us-east-1",
        )
        self.client.create_bucket(Bucket=name)

    def uri(self, prefix: str = "run") -> str:
        return f"s3://{self.name}/{prefix}"

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)


# How a store refuses for good, as (status, its message), and what our message must name for a
# person to fix it.
REFUSALS = {
    "SignatureDoesNotMatch": (403, "The request signature we calculated does not match the signature you provided.",
                              "AWS_SECRET_ACCESS_KEY"),
    "InvalidAccessKeyId": (403, "The AWS Access Key Id you provided does not exist in our records.", "AWS_ACCESS_KEY_ID"),
    "AccessDenied": (403, "Access Denied", "IAM policy"),
}
S3_ERROR = '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>injected</RequestId></Error>'


class Outage:
    """A time the store is away: every request in it is cut off unanswered (the connection reset),
    as a store that went down or a network that dropped does. It begins when ``cut_for`` is called,
    or at the first request ``at`` matches (cut off too), or right after the first request ``after``
    matches has been answered; ``at`` and ``after`` see a request as (method, path with query)."""

    def __init__(self, seconds: float, at=None, after=None):
        self.seconds, self.at, self.after = seconds, at, after
        self.began: float | None = None if at or after else time.monotonic()
        self.cut: list[str] = []  # the requests it cut off, "METHOD path"

    def covers(self, now: float) -> bool:
        return self.began is not None and now < self.began + self.seconds


class FaultyStore:
    """An HTTP proxy in front of an S3 endpoint that answers the requests a test chooses with an S3
    error (status and error document, as a real store sends them), or cuts them off while the
    store is away (``cut_for``), and forwards the others, so that the job meets a store refusing
    its credentials, busy or away, through its real client."""

    def __init__(self, upstream: str):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.upstream = upstream.removeprefix("http://")
        self.faults: list[tuple[int, str, str]] = []  # (status, code, message): each answers one request
        self.always: tuple[int, str, str] | None = None  # answers every request once faults run out
        self.outages: list[Outage] = []
        self.requests = 0
        self.delay = 0.0  # seconds added to each direction of every request it forwards (a slow store)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers "Expect: 100-continue", which the S3 client sends

            def log_message(self, *args):  # the test's output is the job's, not the proxy's
                pass

            def handle_one(self):
                proxy.answer(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_one

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def fail_next(self, times: int, status: int, code: str, message: str) -> None:
        with self._lock:
            self.faults += [(status, code, message)] * times

    def fail_always(self, status: int, code: str, message: str) -> None:
        self.always = (status, code, message)

    def cut_for(self, seconds: float, at=None, after=None) -> Outage:
        """Take the store away for ``seconds`` (see ``Outage`` for when it begins)."""
        outage = Outage(seconds, at, after)
        with self._lock:
            self.outages.append(outage)
        return outage

    def _cut_off(self, request) -> bool:
        """Whether the store is away for this request: if so it is reset, unanswered."""
        import socket
        import struct

        what = (request.command, request.path)
        now = time.monotonic()
        with self._lock:
            for outage in self.outages:
                if outage.began is None and outage.at and outage.at(*what):
                    outage.began = now
            away = [o for o in self.outages if o.covers(now)]
            if not away:
                return False
            for outage in away:  # outages that overlap each count the request they cut
                outage.cut.append(" ".join(what))
        request.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        request.close_connection = True
        return True

    def _answered(self, command: str, path: str) -> None:
        now = time.monotonic()
        with self._lock:
            for outage in self.outages:
                if outage.began is None and outage.after and outage.after(command, path):
                    outage.began = now

    def answer(self, request) -> None:
        import http.client

        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        if self._cut_off(request):
            return
        with self._lock:
            self.requests += 1
            fault = self.faults.pop(0) if self.faults else self.always
        if fault is not None:
            status, code, message = fault
            document = b"" if request.command == "HEAD" else S3_ERROR.format(code=code, message=message).encode()
            request.send_response(status)
            request.send_header("Content-Type", "application/xml")
            request.send_header("Content-Length", str(len(document)))
            request.end_headers()
            request.wfile.write(document)
            return
        time.sleep(self.delay)
        connection = http.client.HTTPConnection(self.upstream, timeout=30)
        try:
            connection.request(request.command, request.path, body, dict(request.headers))
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        time.sleep(self.delay)
        request.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                request.send_header(name, value)
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(data)
        request.wfile.flush()
        self._answered(request.command, request.path)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class RecordingFolder(LocalFolder):
    """A real folder on disk that remembers the order of the writes it received, and can be
    told to fail the next N of them (the store answering 503), to hold them until ``gate`` is
    set, or to take ``seconds`` over each (a slow store); ``most_at_once``: the most writes it
    had in flight together."""

    def __init__(self, root):
        super().__init__(root)
        self.written: list[str] = []
        self.finished: list[str] = []
        self.failures_left = 0
        self.gate = threading.Event()
        self.gate.set()
        self.seconds = 0.0
        self.most_at_once = 0
        self._in_flight = 0
        self._lock = threading.Lock()

    def write_bytes(self, rel, data):
        with self._lock:
            if self.failures_left:
                self.failures_left -= 1
                raise OSError("503 Service Unavailable (injected)")
            self.written.append(rel)
            self._in_flight += 1
            self.most_at_once = max(self.most_at_once, self._in_flight)
        try:
            self.gate.wait(30)
            time.sleep(self.seconds)
            super().write_bytes(rel, data)
        finally:
            with self._lock:
                self._in_flight -= 1
                self.finished.append(rel)


def entrypoint_env(**extra: str) -> dict[str, str]:
    """The environment of a container: no JOB_* or AWS_* settings but the ones given, and the
    interpreter the image would find on PATH."""
    env = {k: v for k, v in job_env().items() if not k.startswith("AWS_")}
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def run_entrypoint(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT,
                   timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(ENTRYPOINT), *args], cwd=cwd, env=env or entrypoint_env(),
                          capture_output=True, text=True, timeout=timeout)


def gone() -> Machine:
    """A process of this machine that has ended (its pid is free)."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    machine = Machine()
    machine.pid = int(ended.stdout)
    return machine


def lease_doc(folder) -> dict:
    return json.loads(folder.read_bytes(Layout.lease))


def record_sends(store: RunStore) -> list[str]:
    """The paths the upload lanes hand to their worker process, in the order they do."""
    sent: list[str] = []
    sender = store.uploader.ordered.remote  # the live lane's too
    real_write = sender.write_bytes
    sender.write_bytes = lambda rel, data: (sent.append(rel), real_write(rel, data))
    return sent


def read_progress(progress: Progress) -> dict:
    return json.loads((progress.store.root / Layout.progress).read_text())
