"""The run folder a job writes (docs/run-folder.md; docs/storage.md): written locally first, atomically, then mirrored
to the run URI when that is remote. Reads look in the cache first, then in the URI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from job.config import StorageConfig
from job.runtime.files import DiskFull, json_bytes
from job.storage.folders import (
    LocalFolder,
    RemoteFolder,
    StorageError,
    Stored,
    default_cache_dir,
    is_remote,
)
from job.storage.lease import Lease
from job.storage.patience import Patience
from job.storage.uploader import Op, Uploader, WorkerFolder

# How long a preflight waits for the upload worker's imports (one still importing then is left
# to the uploads, which wait for it).
WORKER_START_SECONDS = 60.0


class RunStore:
    """A run folder addressed by relative paths (see ``Layout``): written locally first, then
    mirrored to the run URI when that is remote."""

    def __init__(
        self, uri: str, cache_dir: str | Path | None = None, retry_max_seconds: float = 30.0, read_only: bool = False,
        live_upload_seconds: float = 0.0, connect_seconds: float = StorageConfig.connect_seconds,
        proven_reads: bool = False,
    ):
        """``read_only``: a process that only reads the run (a DDP rank other than 0). Its writes
        are dropped on purpose, so that exactly one process owns every file of the run.
        ``live_upload_seconds``: live files (progress, logs, plots) reach the run URI at most
        this often; checkpoints and data are never held back. ``connect_seconds``: how long every
        request this process makes itself to the run URI (reads, listings, the preflight) rides
        out a store that does not answer. ``proven_reads``: every read answers what the run URI
        holds (verify): a cached file counts only when the store's own checksum proves it holds
        the run URI's bytes, anything else is read from the run URI."""
        uri = str(uri)
        self.uri = uri
        self.read_only = read_only
        self.patience = Patience(uri, connect_seconds)
        # The writer's lease (set once taken) fences every write: nothing reaches the run URI
        # unless the lease is live, and nothing is written at all once it is lost.
        self.lease: Lease | None = None
        self.remote: RemoteFolder | None = None
        self.uploader: Uploader | None = None
        self._sender: WorkerFolder | None = None
        self.proven_reads = proven_reads and is_remote(uri)
        self._stored: dict[str, Stored] | None = None  # the run URI's files, once listed (snapshot)
        if is_remote(uri):
            self.remote = RemoteFolder(uri)
            self.local = LocalFolder(cache_dir or default_cache_dir(uri))
            if not read_only:
                # The lanes' requests leave this process (job.storage.upload_worker): botocore's
                # Python would otherwise hold the interpreter lock the training step needs.
                self._sender = WorkerFolder(uri)
                self.uploader = Uploader(
                    self.local, self._sender, retry_max_seconds, live_upload_seconds, guard=self.fence_run,
                )
        else:
            self.local = LocalFolder(uri.removeprefix("file://"))
        self.root = self.local.root

    def fence_run(self) -> None:
        """Before a write reaches the run URI: raise LeaseError unless this writer's lease is live."""
        if self.lease is not None:
            self.lease.check()

    def _fence_write(self) -> None:
        if self.remote is None:
            self.fence_run()  # the local folder is the run
        elif self.lease is not None:
            self.lease.check_held()  # the working copy may run ahead of a lapsed lease, not a lost one

    @property
    def run_folder(self) -> LocalFolder | RemoteFolder:
        """The run URI itself, where the lease lives (not the local working copy)."""
        return self.remote or self.local

    @classmethod
    def for_job(
        cls, uri: str, cache_dir: str | Path | None, storage: Any, read_only: bool = False, proven_reads: bool = False,
    ) -> RunStore:
        """The store a job process uses, tuned by its config's ``storage`` section."""
        return cls(
            uri, cache_dir, retry_max_seconds=storage.retry_max_seconds, read_only=read_only,
            live_upload_seconds=storage.live_upload_seconds, connect_seconds=storage.connect_seconds,
            proven_reads=proven_reads,
        )

    # writes: local, then mirrored
    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.read_only:
            return
        self._fence_write()
        try:
            self.local.write_bytes(rel, data)
        except DiskFull:
            if self.uploader and self.uploader.lane(rel) is self.uploader.live:
                # A live file (progress, a log, a plot) still reaches the run URI, from memory:
                # the bucket must say why the run ended even when this disk cannot.
                self.uploader.submit(Op("put", rel, data=data))
            raise
        self.publish(rel)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def write_json(self, rel: str, value: Any) -> None:
        self.write_bytes(rel, json_bytes(value))

    def publish(self, rel: str, data: bytes | None = None) -> None:
        """Mirror the local file ``rel`` (e.g. a log the logging module appends to); ``data``: its
        bytes as of now, for a file that grows while it waits and whose order counts."""
        if self.uploader:
            self.uploader.submit(Op("put", rel, data=data))

    def delete_tree(self, rel: str, first: tuple[str, ...] = (), known: tuple[str, ...] | None = None) -> None:
        """Delete folder ``rel`` here and at the run URI; the files named in ``first`` go before
        the rest (a checkpoint's manifest, so that a half-deleted one never counts). ``known``:
        every file name the folder holds, when this process wrote them all (the run URI is then
        not listed)."""
        if self.read_only:
            return
        self._fence_write()
        self.local.delete_tree(rel, first)
        if self._stored is not None:  # a new dict: a reader may be going through the old one
            self._stored = {path: stored for path, stored in self._stored.items() if not path.startswith(f"{rel}/")}
        if self.uploader:
            self.uploader.submit(Op("delete_tree", rel, first, known))

    def local_path(self, rel: str) -> Path:
        """Where ``rel`` lives in the local working copy (parents created)."""
        path = self.local.path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # reads: the local copy first, then the run URI (every request there rides out an outage)
    def read_bytes(self, rel: str) -> bytes | None:
        if self.proven_reads:
            return self._read_proven(rel)
        data = self.local.read_bytes(rel)
        if data is None and self._may_hold(rel):
            data = self.read_remotely(rel)
        return data

    def read_remotely(self, rel: str) -> bytes | None:
        """A remote run URI's own copy of ``rel``, whatever the working copy holds."""
        return self.patience(lambda: self.remote.read_bytes(rel))

    def _read_proven(self, rel: str) -> bytes | None:
        stored = self.snapshot().get(rel)
        if stored is None:
            return None  # whatever the cache holds, the run URI has no such file
        data = self.local.read_bytes(rel)
        return data if data is not None and stored.proves(data) else self.read_remotely(rel)

    def snapshot(self) -> dict[str, Stored]:
        """The run URI's files with their sizes and checksums: listed at the first call (one
        request per 1000 files), then kept. From then on the store answers what the run URI holds
        from this listing and its own writes and deletes, and asks the run URI only for the
        content of a file it lists: right for the run's one writer (its lease keeps everyone else
        out), whose start-up decides from one listing, and for a reader that looks once (verify)."""
        if self._stored is None:
            self._stored = self.patience(lambda: self.remote.stored(""))
        return self._stored

    def _may_hold(self, rel: str) -> bool:
        """Whether asking the run URI for file ``rel`` may find it (no request when listed)."""
        return self.remote is not None and (self._stored is None or rel in self._stored)

    def _listed(self, rel: str) -> dict[str, Stored]:
        """The listed files under folder ``rel``, by their path inside it."""
        prefix = f"{rel}/" if rel else ""
        return {path[len(prefix):]: stored for path, stored in self.snapshot().items() if path.startswith(prefix)}

    def read_json(self, rel: str) -> Any | None:
        """The parsed file, or None when it is missing or not valid JSON."""
        data = self.read_bytes(rel)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return None

    @property
    def _listing(self) -> bool:
        """Whether the run URI's side of a question is answered from its snapshot."""
        return self.proven_reads or self._stored is not None

    def exists(self, rel: str) -> bool:
        if not self.proven_reads and self.local.exists(rel):
            return True
        if self._listing:
            return rel in self.snapshot() or bool(self._listed(rel))
        return self.remote is not None and self.patience(lambda: self.remote.exists(rel))

    def list_dir(self, rel: str) -> list[str]:
        names = set() if self.proven_reads else set(self.local.list_dir(rel))
        if self._listing:
            names |= {path.split("/")[0] for path in self._listed(rel)}
        elif self.remote:
            names |= set(self.patience(lambda: self.remote.list_dir(rel)))
        return sorted(names)

    def file_sizes(self, rel: str) -> dict[str, int]:
        """Name -> size of the files in folder ``rel``: the run URI's, then the local copy's."""
        if self._listing:
            sizes = {name: stored.size for name, stored in self._listed(rel).items() if "/" not in name}
        else:
            sizes = self.patience(lambda: self.remote.file_sizes(rel)) if self.remote else {}
        return sizes if self.proven_reads else sizes | self.local.file_sizes(rel)

    def fetch(self, rel: str) -> Path | None:
        """Make sure the local copy holds ``rel``, downloading it if needed; None if nowhere."""
        if not self.local.exists(rel):
            data = self.read_remotely(rel) if self._may_hold(rel) else None
            if data is None:
                return None
            self.local.write_bytes(rel, data)
        return self.local.path(rel)

    # lifecycle
    def preflight(self) -> None:
        """The working copy and the run URI can be written and read back, and the upload worker
        has started. A remote that does not answer is waited for like every other request
        (``patience``): a run that may exist there must never be restarted from scratch because
        the store was briefly away. A store that refuses us for good (StoreRefused) is not
        retried: the person who can fix it hears at once."""
        self.local.check()
        if not self.remote:
            return
        self.patience((lambda: self.remote.list_dir("")) if self.read_only else self.remote.check)
        if self._sender:
            self._sender.check_started(WORKER_START_SECONDS)

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
        if self._sender:
            self._sender.close()
