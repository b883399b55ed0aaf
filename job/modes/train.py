"""``train``: every stage of the run, resumed where its newest valid checkpoint left it
(docs/architecture.md, "The loop")."""

from __future__ import annotations

from job.config import Config
from job.exits import EXIT_OK
from job.modes.common import open_run
from job.runtime.distributed import Topology
from job.storage import RunStore
from job.training.loop import train


def run(cfg: Config, store: RunStore) -> None:
    train(cfg, store, Topology.from_env())  # set by torchrun; one process otherwise


def main(cfg: Config, run_uri: str, cache_dir: str | None) -> int:
    # train preflights (the disk too) and flushes its uploads itself, while it holds the lease.
    open_run(run, cfg, run_uri, cache_dir, preflight_and_flush=False)
    return EXIT_OK
