"""The requests that mirror the working copy to a remote run URI, made by a separate process.

botocore signs, sends and parses each request in Python: ~3 ms holding the interpreter lock per
request, on a thread of the training process, delayed the training step (bench/bench_overhead.py
measured it, ~15% with a checkpoint every 10 steps of the smoke preset). The upload lanes
(job.storage) keep their order, retries and logging; only the calls to the store run in
``python -m job.upload_worker URI CACHE``, which reads the files from the working copy itself,
so that checkpoint bytes never cross the pipe. Endpoint and credentials reach it only through
the environment it inherits, never its command line.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from job.worker import WorkerProcess, serve

# Uploads are not urgent to the second, a training step is: the worker yields the CPU to training.
NICENESS = 10


class UploadWorker:
    """The remote-folder calls an upload lane makes, answered by its own worker process."""

    def __init__(self, uri: str, cache: Path):
        self._worker = WorkerProcess("job.upload_worker", uri, str(cache))

    @property
    def pid(self) -> int | None:
        return self._worker.pid

    def put(self, rel: str) -> bool:
        """Send the working copy's ``rel``; False if it is gone (a later delete follows it)."""
        return self._worker.request({"op": "put", "rel": rel})["sent"]

    def delete(self, rel: str) -> None:
        self._worker.request({"op": "delete", "rel": rel})

    def delete_many(self, rels: list[str]) -> None:
        self._worker.request({"op": "delete_many", "rels": rels})

    def list_files(self, rel: str) -> list[str]:
        return self._worker.request({"op": "list_files", "rel": rel})["files"]

    def stop(self) -> None:
        self._worker.stop()


def main(uri: str, cache: str) -> None:
    from job.storage import LocalFolder, RemoteFolder

    local, remote = LocalFolder(cache), RemoteFolder(uri)

    def handle(request: dict[str, Any]) -> dict[str, Any]:
        op, rel = request["op"], request.get("rel", "")
        if op == "put":
            data = local.read_bytes(rel)  # read now, so that the newest content goes
            if data is not None:
                remote.write_bytes(rel, data)
            return {"sent": data is not None}
        if op == "delete":
            remote.delete(rel)
        elif op == "delete_many":
            remote.delete_many(request["rels"])
        elif op == "list_files":
            return {"files": remote.list_files(rel)}
        else:
            raise ValueError(f"unknown operation {op!r}")
        return {}

    serve(handle, NICENESS)


if __name__ == "__main__":
    main(*sys.argv[1:])
