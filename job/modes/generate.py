"""``generate``: write the run's dataset (docs/model-and-data.md); ``train`` does the same when
the dataset is missing."""

from __future__ import annotations

from job.config import Config
from job.data.dataset import write_dataset
from job.exits import EXIT_OK
from job.modes.common import open_run
from job.storage import RunStore


def run(cfg: Config, store: RunStore) -> None:
    write_dataset(cfg, store)


def main(cfg: Config, run_uri: str, cache_dir: str | None) -> int:
    open_run(run, cfg, run_uri, cache_dir)
    return EXIT_OK
