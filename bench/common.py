"""Helpers shared by the bench scripts (not a bench itself: `make bench` runs bench/bench_*.py).

Every bench prints JSON lines on stdout, nothing else; progress notes go to stderr. Each line
names the machine it ran on, because the numbers mean little without it, and the load average
when it started, because the machine may be shared.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]  # the repository: the working folder of `python -m job` children

FAKE_KEY_ID = "bench"
FAKE_SECRET = "bench-secret-not-a-real-one"


def cpu_model() -> str:
    """The model name, with family/model and the widest vector unit: a VM's "AMD EPYC" alone
    names different generations (AVX2-only Zen 2 or AVX-512 Zen 4) whose speeds differ 2.5x."""
    try:
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        flags = fields.get("flags", "").split()
        vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
        return f"{fields['model name']} (family {fields.get('cpu family')} model {fields.get('model')}, {vector})"
    except (OSError, KeyError):
        return platform.processor() or platform.machine()


def machine(torch_threads: int | None = None) -> dict[str, Any]:
    """What the numbers were measured on. ``torch_threads``: the intra-op threads the measured
    code used (torch.get_num_threads() at the time), when torch is involved."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }
    if "torch" in sys.modules:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch_threads if torch_threads is not None else torch.get_num_threads()
    return info


def emit(record: dict[str, Any], torch_threads: int | None = None) -> None:
    """One JSON line on stdout: the record, the machine, the time."""
    line = {**record, "machine": machine(torch_threads), "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    print(json.dumps(line), flush=True)


def note(message: str) -> None:
    print(f"[{Path(sys.argv[0]).stem}] {message}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float], digits: int = 4) -> list[float]:
    """The individual repeats, rounded, so a reader can see the noise behind a median."""
    return [round(v, digits) for v in values]


def job_env(**extra: str) -> dict[str, str]:
    """The environment of a `python -m job` child: no JOB_* settings leak in from the shell. The
    package comes from the venv (`pip install -e .`), not from a path in the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOB_")}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 server on a free 127.0.0.1 port, in its own process (a real bucket lives on
    another machine, so its CPU time should not be charged to the job's process), with the
    standard AWS environment variables pointing at it for this process and its children."""

    def __init__(self, request_log: Path | None = None) -> None:
        """``request_log``: a file the server appends "METHOD path" to for every request it
        answers, so that a bench counts what a client really sent (``requests()``)."""
        self.request_log = request_log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "S3Server":
        # HTTP/1.1, as S3 speaks it: moto's development server answers HTTP/1.0 and closes the
        # connection after each request, which would charge the job a TCP connect per upload.
        serve = (
            "import sys, moto.server as m\n"
            "m.MotoRequestHandler.protocol_version = 'HTTP/1.1'\n"
            "if sys.argv[1]:\n"
            "    requests = open(sys.argv[1], 'a', buffering=1)\n"
            "    m.MotoRequestHandler.log_request = lambda self, code='-', size='-': requests.write(f'{self.command} {self.path}\\n')\n"
            "m.main(sys.argv[2:])\n"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", serve, str(self.request_log or ""), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the moto S3 server did not start")
                time.sleep(0.1)
        os.environ.update(self.env)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far (user + system)."""
        return cpu_ticks(Path(f"/proc/{self.proc.pid}/stat")) / os.sysconf("SC_CLK_TCK")

    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request answered so far (needs ``request_log``)."""
        lines = self.request_log.read_text().splitlines() if self.request_log and self.request_log.exists() else []
        return [tuple(line.split(" ", 1)) for line in lines if " " in line]

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.url, aws_access_key_id=FAKE_KEY_ID,
            aws_secret_access_key=FAKE_SECRET, region_name="us-east-1",
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def upload_folder(self, folder: Path, bucket: str, prefix: str) -> None:
        """Copy a local run folder into the bucket as it is (what a finished upload leaves)."""
        client = self.client()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder)}", Body=path.read_bytes())


def job_logging_to(path: Path) -> None:
    """The job's logging as `python -m job` sets it up (JSON lines), but into a file instead of
    this process's stdout, which belongs to the bench's JSON result."""
    from job.monitoring.logs import setup_logging

    setup_logging("INFO", mode="train")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setStream(open(path, "a", encoding="utf-8"))  # noqa: SIM115 (lives as long as the process)


class KeepLogHandlers:
    """train() adds a file handler per attempt to the root logger (its RunLog) and never removes
    it (a process runs one attempt); a bench that calls train() repeatedly removes them again."""

    def __enter__(self) -> "KeepLogHandlers":
        self.before = list(logging.getLogger().handlers)
        return self

    def __exit__(self, *exc: object) -> None:
        root = logging.getLogger()
        for handler in list(root.handlers):
            if handler not in self.before:
                root.removeHandler(handler)
                handler.close()


def cpu_ticks(stat: Path) -> int:
    """utime + stime, in clock ticks, from a /proc/.../stat file (fields after the command name,
    which may itself contain spaces and parentheses)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def child_modules(pid: int | str = "self") -> dict[int, str | None]:
    """The running children of a process (none once it is gone): child pid -> the module a
    ``python -m`` child runs, None for any other child."""
    found: dict[int, str | None] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            found[int(child)] = argv[argv.index(b"-m") + 1].decode() if b"-m" in argv[:-1] else None
    return found


def _ticks_or_zero(pid: int) -> int:
    try:
        return cpu_ticks(Path(f"/proc/{pid}/stat"))
    except OSError:
        return 0


class ThreadCPU:
    """CPU seconds used by each thread of this process while the block runs, by thread name
    (threads of the same name, e.g. one per attempt, are added up). Sampled every ``interval``
    seconds from /proc/self/task, so a thread that ends between two samples loses at most one
    interval; threads Python does not know (torch's, the C library's) count as "native". Child
    processes running ``python -m`` (the job's helpers: the upload workers, started with the
    store before the block) count by module for their CPU time during the block if still running
    at its end, else together as "ended child processes" (the plot worker, which ends with
    train()); other children that were there before (the S3 server) do not count."""

    def __init__(self, interval: float = 0.1) -> None:
        import threading

        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._ticks: dict[int, int] = {}
        self._names: dict[int, str] = {}
        self._start: dict[int, int] = {}
        self.seconds: dict[str, float] = {}

    @staticmethod
    def _read() -> dict[int, int]:
        ticks = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                ticks[int(tid)] = cpu_ticks(Path(f"/proc/self/task/{tid}/stat"))
            except OSError:
                continue
        return ticks

    def _sample(self) -> None:
        import threading

        for thread in threading.enumerate():
            if thread.native_id is not None:
                self._names[thread.native_id] = thread.name
        self._ticks.update(self._read())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "ThreadCPU":
        if not Path("/proc/self/task").is_dir():
            return self
        self._start = self._read()
        self._children_start = _children_cpu()
        children = child_modules()
        self._helpers_before = {pid: _ticks_or_zero(pid) for pid, module in children.items() if module}
        self._others_before = {pid for pid, module in children.items() if not module}
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._start:
            return
        self._stop.set()
        self._thread.join()
        self._sample()
        hz = os.sysconf("SC_CLK_TCK")
        totals: dict[str, float] = {}
        for tid, ticks in self._ticks.items():
            name = self._names.get(tid, "native")
            name = name.rstrip("0123456789_").removesuffix("-") or name  # checkpoint_0 -> checkpoint
            totals[name] = totals.get(name, 0.0) + (ticks - self._start.get(tid, 0)) / hz
        for pid, module in child_modules().items():
            if pid not in self._others_before:
                name = module or "other child process"
                try:
                    ticks = cpu_ticks(Path(f"/proc/{pid}/stat")) - self._helpers_before.get(pid, 0)
                except OSError:  # ended just now; not reaped yet, so not in the sum below either
                    continue
                totals[name] = totals.get(name, 0.0) + ticks / hz
        totals["ended child processes"] = _children_cpu() - self._children_start
        self.seconds = {k: round(v, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1]) if v > 0}


def tokenizer_step(model, optimizer, scheduler, videos, cfg, precision=None, forward=None) -> float:
    """The job's own training step (job.training.optim.optimizer_step) on the tokenizer's loss,
    as TokenizerTask.loss gives it; ``forward``: a compiled wrapper of ``model``, if any."""
    from job.models.tokenizer import compute_loss
    from job.training.optim import optimizer_step

    forward = forward or model
    return optimizer_step(lambda: compute_loss(forward(videos), videos, cfg.model)[0], model, optimizer, scheduler,
                          cfg.optim.grad_clip, precision)
