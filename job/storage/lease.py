"""One writer per run (docs/storage.md): a lease in the run folder (``lease.json``), taken and renewed
with conditional writes, so that two `train` processes on one run (a restarted container while
the old one still runs) never both commit.

- Taking: create the file only if absent (S3 ``If-None-Match: *``), or replace the one seen
  (``If-Match: <etag>``) once it is free: released, its holder provably dead (same machine and
  pid namespace, that pid gone), or unchanged (readable or not) for the holder's ``ttl_seconds``
  as measured by the taker's own monotonic clock. No two hosts' clocks are ever compared.
- Holding: renewed every quarter of the TTL from one renewal's sending to the next's
  (``LeaseKeeper``); the holder counts itself valid only until three quarters of the TTL after it
  *sent* its last successful renewal, less the longest round trip of its recent writes, so that a
  write it lets through then still lands in time. A round trip over a quarter TTL is warned of. The taker waits a
  whole TTL after it first *saw* that renewal, so the holder stops committing at least a quarter
  TTL before anyone may take over.
- The run's identity (``run_id``) rides in the lease: minted by the start that finds no lease
  (the run's first), copied by every later holder from the lease it replaced, so that a cache can
  tell its own run from another one at the same URI (job.storage.cache).
- Past that deadline the lease has lapsed: writes that reach the run wait (``check`` raises
  ``LeaseLapsed``; the uploader retries them) while training goes on. A later renewal with the
  same etag proves nobody took over, and writing resumes; a refused one (412: someone else's
  write) means the lease is lost for good (``LeaseLost``) and the process exits 75.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import structlog

from job.exits import EXIT_TRY_LATER
from job.runtime.files import json_bytes
from job.storage.folders import Folder, WriteConflict
from job.storage.layout import Layout

log = structlog.get_logger("job.lease")

VALID_SHARE = 0.75  # of the TTL after the last renewal was sent: the holder's own deadline
RENEW_SHARE = 0.25  # renewals every quarter TTL: three tries fit before the deadline
ROUND_TRIPS_KEPT = 4  # the margin for a write's trip is the longest of the last few measured


class LeaseError(RuntimeError):
    """This process may not write the run (exit 75: a restart later resumes it)."""

    exit_code, summary = EXIT_TRY_LATER, "this process may not write the run"


class LeaseBusy(LeaseError):
    """Another live writer holds the run."""

    summary = "another writer holds the run"


class LeaseLost(LeaseError):
    """Another writer took the run's lease: this one must never write to the run again."""


class LeaseLapsed(LeaseError):
    """No renewal got through in time (the store is away): writes to the run wait until one does,
    or until the lease turns out lost."""


def utc(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


class Machine:
    """Who this process is, as far as another process may check it: the same kernel boot and pid
    namespace make a pid a fact that can be checked with ``kill(pid, 0)``."""

    def __init__(self) -> None:
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.boot_id = _read("/proc/sys/kernel/random/boot_id")
        try:
            self.pid_namespace = os.readlink("/proc/self/ns/pid")
        except OSError:
            self.pid_namespace = None

    def fields(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "boot_id": self.boot_id, "pid_namespace": self.pid_namespace}

    def holder_is_gone(self, doc: dict[str, Any]) -> bool:
        """True only when the holder provably no longer runs: it was a process of this machine's
        boot and pid namespace, and that pid is gone (or is this very process)."""
        if self.boot_id is None or self.pid_namespace is None:
            return False
        if doc.get("boot_id") != self.boot_id or doc.get("pid_namespace") != self.pid_namespace:
            return False
        pid = doc.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return False
        return pid == self.pid or not _process_alive(pid)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    stat = _read(f"/proc/{pid}/stat")  # a killed child its parent has not reaped yet is a zombie
    return not (stat and stat.rsplit(")", 1)[-1].split()[:1] == ["Z"])


class Lease:
    """This process's claim on one run folder's ``lease.json``."""

    def __init__(
        self, folder: Folder, ttl_seconds: float, clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep, machine: Machine | None = None,
        wall: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
        patience: Callable[[Callable[[], Any]], Any] = lambda request: request(),
    ):
        """``clock``/``sleep``: the monotonic clock every deadline uses (tests pass fake ones);
        ``wall``: only for the timestamps written for people (status), never for decisions;
        ``patience``: how taking the lease rides out a store that is away (the run store's,
        job.storage.patience); renewals do not wait: one that fails is a lapse."""
        self.folder, self.ttl, self.patience = folder, float(ttl_seconds), patience
        self.clock, self.sleep, self.wall = clock, sleep, wall
        self.machine = machine or Machine()
        self.holder = uuid.uuid4().hex
        self.run_id: str | None = None  # the run's identity, known once the lease is taken
        self.attempt: int | None = None
        self.previous_attempt: Any = None  # the attempt named in the lease this one replaced, if any
        self.acquired_at: str | None = None
        self.renewals = 0
        self._etag: str | None = None
        self._sent_at = -math.inf  # monotonic time the last successful write was sent
        self._round_trips: deque[float] = deque(maxlen=ROUND_TRIPS_KEPT)  # of the last successful writes
        self._warned_slow = False
        self._lost: str | None = "not taken yet"
        self._writing = threading.Lock()  # the keeper's renewals and the main thread's note/release

    # --- taking ----------------------------------------------------------------------------

    def acquire(self, wait_seconds: float) -> str:
        """Take the lease, waiting up to ``wait_seconds`` for a live holder to go; returns why it
        was free. Raises LeaseBusy naming the holder when it is still alive at the end."""
        deadline = self.clock() + wait_seconds
        seen: str | None = None
        seen_since = self.clock()
        told: str | None = None
        while True:
            current = self.patience(lambda: self.folder.read_tagged(Layout.lease))
            if current is None:
                reason, doc, etag = "no lease", None, None
            else:
                data, etag = current
                doc = _parse(data)
                if etag != seen:
                    seen, seen_since = etag, self.clock()
                reason = self._free(doc, self.clock() - seen_since)
            if reason:
                self.run_id = _run_id(doc) or uuid.uuid4().hex
                try:
                    self.patience(lambda: self._write(etag))
                except WriteConflict:  # another starter won the race, or a try whose answer was lost landed: look again
                    continue
                self._lost = None
                self.previous_attempt = (doc or {}).get("attempt")
                log.info(
                    "lease.taken", reason=reason, holder=self.holder, previous=_who(doc), ttl_seconds=self.ttl,
                    run_id=self.run_id,
                )
                return reason
            left = deadline - self.clock()
            if left <= 0:
                raise LeaseBusy(
                    f"another writer holds this run: {_who(doc)}; waited {wait_seconds:.0f} s for it to end. "
                    f"Two writers would corrupt the run, so this one stops; a restart after that writer ends "
                    f"(or its lease expires, {_ttl(doc, self.ttl):.0f} s after its last renewal) resumes the run"
                )
            if told != (doc or {}).get("holder"):  # once per holder, not at every look
                told = (doc or {}).get("holder")
                log.warning("lease.busy", holder=_who(doc), waiting_seconds=round(left, 1))
            self.sleep(min(left, self.poll_seconds))

    @property
    def poll_seconds(self) -> float:
        return min(self.ttl * RENEW_SHARE, 2.0)

    def _free(self, doc: dict[str, Any] | None, unchanged_for: float) -> str | None:
        """Why the lease in ``doc`` may be taken now, or None while its holder may be alive."""
        # An unreadable lease names no holder to check: it is free once it has not changed for a TTL.
        if doc is not None and doc.get("released_at"):
            return "released"
        if doc is not None and self.machine.holder_is_gone(doc):
            return "holder process gone"
        if unchanged_for >= _ttl(doc, self.ttl):
            return "expired"
        return None

    # --- holding ---------------------------------------------------------------------------

    def renew(self) -> None:
        """Extend the lease; raises LeaseLost when someone else's write replaced it. A renewal after
        a lapse succeeds only if nobody wrote the lease meanwhile (its etag is still ours)."""
        with self._writing:
            self.check_held()
            lapsed = self.lapsed_for()
            try:
                self._write(self._etag)
            except WriteConflict:
                if not self._adopt_own_write():
                    self._lost = f"taken over by {_who(self._current())}"
                    raise LeaseLost(self._lost) from None
                self._write(self._etag)
        if lapsed is not None:
            log.warning("lease.renewed_after_lapse", lapsed_seconds=round(lapsed, 1))

    def check(self) -> None:
        """The fence of every write that reaches the run: raise unless this process holds a
        live lease now."""
        self.check_held()
        lapsed = self.lapsed_for()
        if lapsed is not None:
            raise LeaseLapsed(
                f"the run's lease has not been renewed for {self.clock() - self._sent_at:.1f} s "
                f"(lease {self.ttl:.0f} s, round trip {self.round_trip:.1f} s): writes to the run wait "
                "until a renewal gets through"
            )

    def check_held(self) -> None:
        """Raise LeaseLost once the lease is lost (or released): nothing more may be written."""
        if self._lost is not None:
            raise LeaseLost(f"this process no longer holds the run's lease: {self._lost}")

    def lapsed_for(self) -> float | None:
        """Seconds since this holder's own deadline passed, or None while the lease is live. The
        deadline is a round trip early: a write let through just before it lands by then."""
        over = self.clock() - self._sent_at - (self.ttl * VALID_SHARE - self.round_trip)
        return over if over >= 0 else None

    @property
    def round_trip(self) -> float:
        """The longest round trip of the last few writes of the lease (0 before any)."""
        return max(self._round_trips, default=0.0)

    def renew_in(self) -> float:
        """Seconds until the next renewal is due: a quarter TTL after the last one was sent."""
        return self._sent_at + self.ttl * RENEW_SHARE - self.clock()

    def note_attempt(self, attempt: int) -> None:
        """Record the attempt number in the lease at once (it is known only once the lease is held).
        A store that is away meanwhile does not end the start: like any renewal that fails, this
        one is a lapse (the fence holds writes back), and the keeper's next renewal carries the
        number."""
        self.attempt = attempt
        try:
            self.renew()
        except LeaseLost:
            raise
        except Exception as exc:
            log.warning("lease.renew_failed", attempt=attempt, error=f"{type(exc).__name__}: {exc}")

    def release(self) -> None:
        """Mark the lease released, so that the next start takes it at once. Best effort: a
        lease that cannot be released expires."""
        with self._writing:
            if self._lost is not None:
                return
            try:
                self._write(self._etag, released=True)
                log.info("lease.released", holder=self.holder)
            except Exception as exc:
                log.warning("lease.release_failed", error=f"{type(exc).__name__}: {exc}")
            self._lost = "released"

    def _current(self) -> dict[str, Any] | None:
        try:
            current = self.folder.read_tagged(Layout.lease)
        except Exception:
            return None
        return _parse(current[0]) if current else None

    def _adopt_own_write(self) -> bool:
        """A renewal whose answer was lost may still have landed: if the file is ours and not
        released, continue from its tag (keeping the older, safer send time)."""
        current = self.folder.read_tagged(Layout.lease)
        if current is None:
            return False
        doc = _parse(current[0])
        if doc is None or doc.get("holder") != self.holder or doc.get("released_at"):
            return False
        self._etag = current[1]
        return True

    def _write(self, etag: str | None, released: bool = False) -> None:
        now = self.wall()
        self.acquired_at = self.acquired_at or utc(now)
        doc = {
            "run_id": self.run_id, "holder": self.holder, **self.machine.fields(), "attempt": self.attempt,
            "acquired_at": self.acquired_at, "renewed_at": utc(now),
            "expires_at": utc(now + timedelta(seconds=self.ttl)), "ttl_seconds": self.ttl,
            "renewals": self.renewals,  # the content, hence the tag, changes at every renewal
            "released_at": utc(now) if released else None,
        }
        sent = self.clock()
        self._etag = self.folder.write_if(Layout.lease, json_bytes(doc), etag)
        self._sent_at = sent
        self._round_trips.append(self.clock() - sent)
        self.renewals += 1
        if self.round_trip > self.ttl * RENEW_SHARE and not self._warned_slow:
            self._warned_slow = True
            log.warning(
                "lease.slow_store", round_trip_seconds=round(self.round_trip, 2), lease_seconds=self.ttl,
                setting="storage.lease_seconds", advice=f"at least {20 * self.round_trip:.0f} s (20 round trips)",
                why="a round trip over a quarter of the lease leaves too little of it to write in: "
                    "writes to the run keep waiting for renewals",
            )


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _run_id(doc: dict[str, Any] | None) -> str | None:
    """The identity a lease carries, when it is one this job mints (hex digits only: it names a
    folder of the cache)."""
    run_id = (doc or {}).get("run_id")
    return run_id if isinstance(run_id, str) and 0 < len(run_id) <= 64 and all(c in "0123456789abcdef" for c in run_id) else None


def _ttl(doc: dict[str, Any] | None, default: float) -> float:
    """The holder's own TTL (it renews by it), when it is a sane number."""
    ttl = (doc or {}).get("ttl_seconds")
    return float(ttl) if isinstance(ttl, (int, float)) and 0 < ttl < 86400 else default


def _who(doc: dict[str, Any] | None) -> str:
    if not doc:
        return "nobody"
    return (
        f"attempt {doc.get('attempt')} on host {doc.get('host')} (pid {doc.get('pid')}), "
        f"renewed at {doc.get('renewed_at')}"
    )
