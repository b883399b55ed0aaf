"""``python -m job.storage.upload_worker URI AT_ONCE``: the process that makes the upload lanes'
requests to a remote run URI (job.runtime.workers; the lanes' side is job.storage.uploader.WorkerFolder).

An S3 request costs the client milliseconds of pure Python (botocore building, signing and
parsing it) under the interpreter lock; in the training process that is taken from the training
step, which needs the lock between its kernels (docs/benchmarks.md, "Why the code is as it
is"). So the lanes send through this process, with
its own S3 client, working on up to AT_ONCE requests together (both lanes': a checkpoint's upload
never holds back a heartbeat, and a slow store's round trips overlap); the lanes (order, pacing, retries, the lease's fence) stay in the
training process and hand over bytes and names only.
"""

from __future__ import annotations

import sys
from typing import Any

from job.runtime.workers import serve
from job.storage.folders import RemoteFolder


def handler(folder: RemoteFolder):
    """The answer to each of WorkerFolder's requests, made with ``folder``."""

    def handle(request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        if op == "write_bytes":
            folder.write_bytes(request["rel"], request["payload"])
        elif op == "delete":
            folder.delete(request["rel"])
        elif op == "delete_many":
            folder.delete_many(request["rels"])
        elif op == "list_files":
            return {"files": folder.list_files(request["rel"])}
        else:
            raise ValueError(f"unknown request {op!r}")
        return {}

    return handle


if __name__ == "__main__":
    remote = RemoteFolder(sys.argv[1])
    remote.connect()
    serve(handler(remote), concurrency=int(sys.argv[2]))
