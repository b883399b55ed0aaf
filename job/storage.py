"""The run folder (SPEC §4, §10): the one place that knows its layout, behind a small interface.

Every file is written to a local working copy first, atomically. For a local run URI the
working copy *is* the run folder. For a remote URI (``s3://bucket/prefix``, or any fsspec URL)
the working copy is a cache folder, mirrored to the URI by a background ``Uploader``, so a slow
or dead bucket never blocks a training step. Reads look in the cache first, then in the URI.
Callers never learn which kind of run folder they have.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import structlog
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential_jitter

from job.fsutil import atomic_write_bytes

log = structlog.get_logger("job.storage")


class StorageError(RuntimeError):
    """The run folder cannot be used (unreachable, not writable, a backlog that cannot be delivered)."""


class Layout:
    """Relative paths inside a run folder. Nothing else spells these names."""

    progress = "progress.json"
    progress_text = "PROGRESS.txt"
    config = "config.json"
    metrics = "metrics.jsonl"
    logs = "logs"
    plots = "plots"
    loss_plot = "plots/loss.png"
    reconstruction_plot = "plots/reconstruction.png"
    data = "data"
    data_manifest = "data/manifest.json"
    checkpoints = "checkpoints"
    latest = "checkpoints/latest.json"
    verify_report = "verify/report.json"
    eval = "eval"

    # Files whose remote copies must arrive in the order they were written (a manifest after
    # the files it lists, latest.json after the manifest); everything else only needs its
    # newest content to arrive.
    ordered_prefixes = ("checkpoints/", "data/")

    @staticmethod
    def checkpoint_name(step: int) -> str:
        # Zero-padded so that names sort by step as strings do.
        return f"step-{step:08d}"

    @staticmethod
    def checkpoint_dir(name: str) -> str:
        return f"checkpoints/{name}"

    @staticmethod
    def checkpoint_file(name: str, filename: str) -> str:
        return f"checkpoints/{name}/{filename}"

    checkpoint_manifest_file = "manifest.json"

    @staticmethod
    def checkpoint_manifest(name: str) -> str:
        return f"checkpoints/{name}/{Layout.checkpoint_manifest_file}"

    @staticmethod
    def log_file(attempt: int) -> str:
        return f"logs/attempt-{attempt:03d}.jsonl"

    @staticmethod
    def attempt_of_log(filename: str) -> int | None:
        """The attempt number in a log file's name, or None for any other file."""
        stem = filename.removeprefix("attempt-").removesuffix(".jsonl")
        return int(stem) if filename.startswith("attempt-") and stem.isdigit() else None


# --- folders: where bytes live -----------------------------------------------------------


class LocalFolder:
    """A folder on local disk; writes are atomic (temp file, fsync, rename)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            return self.path(rel).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def write_bytes(self, rel: str, data: bytes) -> None:
        atomic_write_bytes(self.path(rel), data)

    def list_dir(self, rel: str) -> list[str]:
        folder = self.path(rel)
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def list_files(self, rel: str) -> list[str]:
        """Relative paths of every file under folder ``rel``."""
        folder = self.path(rel)
        if not folder.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in folder.rglob("*") if p.is_file())

    def file_sizes(self, rel: str) -> dict[str, int]:
        """Size of each file directly inside folder ``rel``, by name."""
        sizes = {}
        for name in self.list_dir(rel):
            try:
                stat = (self.path(rel) / name).stat()
            except FileNotFoundError:  # deleted between the listing and the stat
                continue
            if not (self.path(rel) / name).is_dir():
                sizes[name] = stat.st_size
        return sizes

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def delete(self, rel: str) -> None:
        self.path(rel).unlink(missing_ok=True)

    def delete_tree(self, rel: str) -> None:
        # Manifests first: a half-deleted checkpoint must never look committed.
        for manifest in self.path(rel).rglob(Layout.checkpoint_manifest_file) if self.path(rel).is_dir() else ():
            manifest.unlink(missing_ok=True)
        shutil.rmtree(self.path(rel), ignore_errors=True)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"run folder {self.uri} cannot be created: {exc}") from exc
        _probe(self)


class RemoteFolder:
    """A folder behind an fsspec URL (s3://bucket/prefix). Endpoint and credentials come only from
    the standard AWS chain (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, instance roles, ...).

    Each call fails fast (short timeouts, one try): retrying is the caller's job, with backoff
    and logging, rather than the client's hidden one."""

    def __init__(self, uri: str):
        import fsspec  # imported here: a local run never needs it

        self.uri = uri.rstrip("/")
        options: dict[str, Any] = {"skip_instance_cache": True, "use_listings_cache": False}
        if urlparse(uri).scheme in ("s3", "s3a"):
            options["config_kwargs"] = {"connect_timeout": 3, "read_timeout": 20, "retries": {"max_attempts": 1}}
        self.fs, self.base = fsspec.core.url_to_fs(self.uri, **options)
        if hasattr(self.fs, "retries"):
            self.fs.retries = 1

    def _full(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._full(rel))
        except FileNotFoundError:
            return None

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self._full(rel), data)

    def list_dir(self, rel: str) -> list[str]:
        try:
            entries = self.fs.ls(self._full(rel), detail=False)
        except FileNotFoundError:
            return []
        prefix = self._full(rel).rstrip("/") + "/"
        return sorted({e[len(prefix):].split("/")[0] for e in entries if e.startswith(prefix)} - {""})

    def list_files(self, rel: str) -> list[str]:
        try:
            found = self.fs.find(self._full(rel))
        except FileNotFoundError:
            return []
        return sorted(f[len(self.base) + 1 :] for f in found)

    def file_sizes(self, rel: str) -> dict[str, int]:
        try:
            entries = self.fs.ls(self._full(rel), detail=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rsplit("/", 1)[-1]: e["size"] for e in entries if e.get("type") == "file"}

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._full(rel))

    def delete(self, rel: str) -> None:
        try:
            self.fs.rm_file(self._full(rel))
        except FileNotFoundError:
            pass

    def delete_many(self, rels: list[str]) -> None:
        """Delete files, in one request per 1000 on S3 (DeleteObjects), one by one elsewhere."""
        if not hasattr(self.fs, "call_s3"):
            for rel in rels:
                self.delete(rel)
            return
        bucket = self.fs.split_path(self.base)[0]
        for start in range(0, len(rels), 1000):
            keys = [{"Key": self.fs.split_path(self._full(rel))[1]} for rel in rels[start : start + 1000]]
            answer = self.fs.call_s3("delete_objects", Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            # A quiet DeleteObjects answers 200 and lists only the keys it could not delete.
            errors = answer.get("Errors") or []
            if errors:
                first = errors[0]
                raise OSError(
                    f"{len(errors)} key(s) not deleted, e.g. {first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )

    def check(self) -> None:
        _probe(self)


def _probe(folder: LocalFolder | RemoteFolder) -> None:
    """Write, read back and delete a small file: the folder is usable now."""
    probe = f".preflight-{os.getpid()}"
    folder.write_bytes(probe, b"ok")
    if folder.read_bytes(probe) != b"ok":
        raise StorageError(f"run folder {folder.uri}: a file written there did not read back")
    folder.delete(probe)


def open_folder(uri: str) -> LocalFolder | RemoteFolder:
    """Direct access to a run folder, without a cache (what ``status`` reads)."""
    return RemoteFolder(uri) if is_remote(uri) else LocalFolder(uri.removeprefix("file://"))


def is_remote(uri: str) -> bool:
    scheme = urlparse(uri).scheme
    return scheme not in ("", "file") and len(scheme) > 1  # one letter: a Windows drive


def default_cache_dir(uri: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    parsed = urlparse(uri)
    return base / "magvit-job" / parsed.scheme / parsed.netloc / parsed.path.strip("/")


# --- the uploader ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Op:
    kind: str  # "put" | "delete" | "delete_tree"
    rel: str


class _Lane:
    """One background thread delivering operations to the remote folder in order.

    Submitting an operation on a path that is already waiting moves it to the back of the line
    (its content is read when it is sent, so the newest content goes and goes once)."""

    def __init__(self, name: str, local: LocalFolder, remote: RemoteFolder, max_wait: float, pause: float = 0.0):
        """``pause``: a file is sent again no sooner than this after its last send (unless someone
        waits for a flush), so that a file rewritten many times a second goes once per pause,
        while a file not sent lately (the first progress of an attempt) goes at once."""
        self.name, self.local, self.remote, self.max_wait, self.pause = name, local, remote, max_wait, pause
        self._pending: OrderedDict[str, _Op] = OrderedDict()
        self._cond = threading.Condition()
        self._busy = False
        self._last_sent: dict[str, float] = {}
        self._flushers = 0
        self._abandon = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"upload-{name}", daemon=True)
        self._thread.start()

    def submit(self, op: _Op) -> None:
        with self._cond:
            self._pending.pop(op.rel, None)
            self._pending[op.rel] = op
            self._cond.notify_all()

    def backlog(self) -> list[str]:
        with self._cond:
            return list(self._pending)

    def wait_idle(self, deadline: float) -> bool:
        with self._cond:
            self._flushers += 1
            self._cond.notify_all()  # ends a rest
            try:
                while self._pending or self._busy:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(left)
                return True
            finally:
                self._flushers -= 1

    def abandon(self) -> None:
        """Stop retrying: the process is about to exit with what it could deliver."""
        self._abandon.set()
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._abandon.is_set():
                    rel, wait = self._next_due()
                    if rel is not None:
                        break
                    self._cond.wait(wait)
                if self._abandon.is_set():
                    return
                op = self._pending[rel]
                self._busy = True
            delivered = self._deliver(op)
            with self._cond:
                if delivered and self._pending.get(rel) is op:
                    del self._pending[rel]
                if self.pause:
                    self._last_sent[rel] = time.monotonic()
                self._busy = False
                self._cond.notify_all()

    def _next_due(self) -> tuple[str | None, float | None]:
        """The oldest waiting path that may be sent now, else (None, seconds until one may)."""
        if not self._pending:
            return None, None
        now, soonest = time.monotonic(), math.inf
        for rel in self._pending:
            due = self._last_sent.get(rel, -math.inf) + self.pause
            if due <= now or self._flushers:
                return rel, None
            soonest = min(soonest, due - now)
        return None, soonest

    def _deliver(self, op: _Op) -> bool:
        retrying = Retrying(
            wait=wait_exponential_jitter(multiplier=0.5, max=self.max_wait),
            retry=retry_if_exception_type(Exception),
            stop=lambda state: self._abandon.is_set(),
            sleep=self._abandon.wait,  # an abandon ends the wait at once
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            retrying(self._apply, op)
            return True
        except Exception as exc:  # only reached once abandoned
            log.error("upload.abandoned", lane=self.name, path=op.rel, error=_describe(exc))
            return False

    def _apply(self, op: _Op) -> None:
        if op.kind == "put":
            data = self.local.read_bytes(op.rel)
            if data is not None:  # gone locally: a later delete will follow it
                self.remote.write_bytes(op.rel, data)
        elif op.kind == "delete":
            self.remote.delete(op.rel)
        elif op.kind == "delete_tree":
            # Manifests first, on their own: a half-deleted checkpoint must never look committed.
            files = self.remote.list_files(op.rel)
            manifests = [f for f in files if f.endswith(Layout.checkpoint_manifest_file)]
            for rel in manifests:
                self.remote.delete(rel)
            rest = [f for f in files if f not in manifests]
            if rest:
                self.remote.delete_many(rest)

    def _log_retry(self, state: RetryCallState) -> None:
        op = state.args[0]
        log.warning(
            "upload.retry", lane=self.name, path=op.rel, attempt=state.attempt_number,
            wait_seconds=round(state.upcoming_sleep, 2), error=_describe(state.outcome.exception()),
        )


def _describe(exc: BaseException | None) -> str:
    """The store's own words: botocore's ClientError carries its code and message in str()."""
    return f"{type(exc).__name__}: {exc}" if exc else "unknown error"


class Uploader:
    """Mirrors the local working copy to the remote folder in the background: one lane for
    files whose order matters (checkpoints, data), one for live files (progress, logs, plots),
    so that a large checkpoint never holds back a heartbeat."""

    def __init__(self, local: LocalFolder, remote: RemoteFolder, max_wait: float, live_pause: float = 0.0):
        self.ordered = _Lane("ordered", local, remote, max_wait)
        # Every request costs CPU in this process (botocore holds the GIL that training needs)
        # and at the store: progress and logs, rewritten several times a second, rest between sends.
        self.live = _Lane("live", local, remote, max_wait, pause=live_pause)

    def lane(self, rel: str) -> _Lane:
        return self.ordered if rel.startswith(Layout.ordered_prefixes) else self.live

    def submit(self, op: _Op) -> None:
        self.lane(op.rel).submit(op)

    def flush(self, timeout: float) -> list[str]:
        """Wait up to ``timeout`` seconds for the backlog to drain; return what is left."""
        deadline = time.monotonic() + timeout
        self.ordered.wait_idle(deadline)
        self.live.wait_idle(deadline)
        return self.ordered.backlog() + self.live.backlog()

    def abandon(self) -> None:
        self.ordered.abandon()
        self.live.abandon()


# --- the run store ----------------------------------------------------------------------


class RunStore:
    """A run folder addressed by relative paths (see ``Layout``): written locally first, then
    mirrored to the run URI when that is remote."""

    def __init__(
        self, uri: str, cache_dir: str | Path | None = None, retry_max_seconds: float = 30.0, read_only: bool = False,
        live_upload_seconds: float = 0.0,
    ):
        """``read_only``: a process that only reads the run (a DDP rank other than 0). Its writes
        are dropped on purpose, so that exactly one process owns every file of the run.
        ``live_upload_seconds``: live files (progress, logs, plots) reach the run URI at most
        this often; checkpoints and data are never held back."""
        uri = str(uri)
        self.uri = uri
        self.read_only = read_only
        self.remote: RemoteFolder | None = None
        self.uploader: Uploader | None = None
        if is_remote(uri):
            self.remote = RemoteFolder(uri)
            self.local = LocalFolder(cache_dir or default_cache_dir(uri))
            self.uploader = None if read_only else Uploader(self.local, self.remote, retry_max_seconds, live_upload_seconds)
        else:
            self.local = LocalFolder(uri.removeprefix("file://"))
        self.root = self.local.root

    @classmethod
    def for_job(cls, uri: str, cache_dir: str | Path | None, storage: Any, read_only: bool = False) -> RunStore:
        """The store a job process uses, tuned by its config's ``storage`` section."""
        return cls(
            uri, cache_dir, retry_max_seconds=storage.retry_max_seconds, read_only=read_only,
            live_upload_seconds=storage.live_upload_seconds,
        )

    # writes: local, then mirrored
    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.read_only:
            return
        self.local.write_bytes(rel, data)
        self.publish(rel)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def write_json(self, rel: str, value: Any) -> None:
        self.write_bytes(rel, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())

    def publish(self, rel: str) -> None:
        """Mirror the local file ``rel`` (e.g. a log the logging module appends to)."""
        if self.uploader:
            self.uploader.submit(_Op("put", rel))

    def delete_tree(self, rel: str) -> None:
        if self.read_only:
            return
        self.local.delete_tree(rel)
        if self.uploader:
            self.uploader.submit(_Op("delete_tree", rel))

    def local_path(self, rel: str) -> Path:
        """Where ``rel`` lives in the local working copy (parents created)."""
        path = self.local.path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # reads: the local copy first, then the run URI
    def read_bytes(self, rel: str) -> bytes | None:
        data = self.local.read_bytes(rel)
        if data is None and self.remote:
            data = self.remote.read_bytes(rel)
        return data

    def read_json(self, rel: str) -> Any | None:
        """The parsed file, or None when it is missing or not valid JSON."""
        data = self.read_bytes(rel)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return None

    def exists(self, rel: str) -> bool:
        return self.local.exists(rel) or bool(self.remote and self.remote.exists(rel))

    def exists_remotely(self, rel: str) -> bool:
        """Whether the run URI itself holds ``rel`` (always true for a local run)."""
        return self.remote.exists(rel) if self.remote else self.local.exists(rel)

    def list_dir(self, rel: str) -> list[str]:
        names = set(self.local.list_dir(rel))
        if self.remote:
            names |= set(self.remote.list_dir(rel))
        return sorted(names)

    def fetch(self, rel: str) -> Path | None:
        """Make sure the local copy holds ``rel``, downloading it if needed; None if nowhere."""
        if not self.local.exists(rel):
            data = self.remote.read_bytes(rel) if self.remote else None
            if data is None:
                return None
            self.local.write_bytes(rel, data)
        return self.local.path(rel)

    # lifecycle
    def preflight(self, connect_seconds: float) -> None:
        """The working copy and the run URI can be written and read back. A remote that does not
        answer is retried for ``connect_seconds``: a run that may exist there must never be
        restarted from scratch because the store was briefly away."""
        self.local.check()
        if not self.remote:
            return
        check = (lambda: self.remote.list_dir("")) if self.read_only else self.remote.check
        retrying = Retrying(
            wait=wait_exponential_jitter(multiplier=0.5, max=10),
            stop=lambda state: state.seconds_since_start >= connect_seconds,
            before_sleep=lambda state: log.warning(
                "storage.unreachable", uri=self.uri, attempt=state.attempt_number,
                error=_describe(state.outcome.exception()),
            ),
            reraise=True,
        )
        try:
            retrying(check)
        except Exception as exc:
            raise StorageError(f"run URI {self.uri} is not reachable after {connect_seconds:.0f} s: {_describe(exc)}") from exc

    def flush(self, timeout: float) -> None:
        """Deliver the backlog within ``timeout`` seconds, or raise StorageError naming what is
        left (the local working copy keeps it for the next attempt)."""
        if not self.uploader:
            return
        left = self.uploader.flush(timeout)
        if left:
            self.uploader.abandon()
            shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
            raise StorageError(
                f"{len(left)} file(s) could not be delivered to {self.uri} within {timeout:.0f} s ({shown}); "
                f"they stay in the local cache {self.root} for the next attempt"
            )

    def close(self) -> None:
        if self.uploader:
            self.uploader.abandon()

