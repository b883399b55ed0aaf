"""A helper process for tests/drills/test_worker.py: ``python -m tests.drills.sleepy_worker
CONCURRENCY`` answers {"sleep": seconds} after sleeping that long, with the size and sha256 of any
payload."""

import hashlib
import sys
import time

from job.runtime.workers import serve


def handle(request: dict) -> dict:
    time.sleep(request["sleep"])
    payload = request.get("payload", b"")
    return {"slept": request["sleep"], "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


if __name__ == "__main__":
    serve(handle, concurrency=int(sys.argv[1]))
