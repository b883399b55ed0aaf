"""Crash-safe local file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from job.exits import EXIT_FAILED

# A write that failed for lack of room: the disk is full, or the user's quota is.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(OSError):
    """A local write failed for lack of space; the message names the path and the space, so a
    traceback adds nothing (exit 1)."""

    exit_code, summary = EXIT_FAILED, "disk full"

    def __str__(self) -> str:
        return self.strerror


def disk_full(path: Path, needed: int | None) -> DiskFull:
    """The error for a write of ``needed`` bytes (if known) to ``path`` that found no space,
    saying how much is free on that disk now."""
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    wanted = f", {size_text(needed)} needed for this file" if needed is not None else ""
    return DiskFull(
        errno.ENOSPC, f"no space left on device writing {path}: {size_text(free)} free there{wanted}; free some space "
        "(or give the job a larger disk) and start it again: it resumes from its last checkpoint",
    )


def size_text(size: int) -> str:
    return f"{size / 2**20:.2f} MiB" if size >= 2**20 else f"{size} bytes"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder: write, fsync, rename,
    then fsync the folder so that the rename itself survives a power cut. A full disk raises
    DiskFull (and leaves no temp file behind)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise disk_full(path, len(data)) from exc
        raise


def json_bytes(value: Any) -> bytes:
    """The one JSON form of every file the job writes: sorted keys, so that the same value gives
    the same bytes, and indented for a person reading the bucket."""
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, json_bytes(value))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
