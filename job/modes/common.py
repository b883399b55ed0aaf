"""What every mode does around its story: open the run folder, make sure it answers, and deliver
what the mode wrote before the process ends."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from job.config import Config
from job.monitoring.page.write import PageWriter
from job.runtime.distributed import Topology
from job.storage import RunStore

T = TypeVar("T")


def open_run(
    run: Callable[[Config, RunStore], T], cfg: Config, run_uri: str, cache_dir: str | None,
    preflight_and_flush: bool = True, proven_reads: bool = False,
) -> T:
    """Run a mode's ``run(cfg, store)`` on the run folder and return what it returns. Under
    torchrun only rank 0 writes (the others get a read-only store).
    ``preflight_and_flush``: wait (boundedly) for the run URI to answer first, and deliver the
    uploads at the end; ``train`` does both itself, inside its lease. ``proven_reads``: read what
    the run URI holds, the cache only where it provably holds the same bytes (RunStore)."""
    topology = Topology.from_env()
    store = RunStore.for_job(run_uri, cache_dir, cfg.storage, read_only=not topology.is_writer, proven_reads=proven_reads)
    try:
        if preflight_and_flush:
            store.preflight()
        result = run(cfg, store)
        if preflight_and_flush:
            PageWriter.for_store(store).write_now(store)  # what the mode wrote (a report, samples) shows there
            store.flush(cfg.storage.end_flush_seconds)
    finally:
        store.close()
    return result
