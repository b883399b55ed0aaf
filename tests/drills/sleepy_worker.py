"""A helper process for tests/drills/test_worker.py: ``python -m tests.drills.sleepy_worker
CONCURRENCY`` answers {"sleep": seconds} after sleeping that long, with the size and sha256 of any
payload and the order it finished in ("finished": 0 for the first)."""

import hashlib
import itertools
import sys
import threading
import time

from job.runtime.workers import serve

_finished, _counting = itertools.count(), threading.Lock()


def handle(request: dict) -> dict:
    time.sleep(request["sleep"])
    payload = request.get("payload", b"")
    with _counting:
        finished = next(_finished)
    return {"slept": request["sleep"], "finished": finished, "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


if __name__ == "__main__":
    serve(handle, concurrency=int(sys.argv[1]))
