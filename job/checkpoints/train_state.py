"""Where a run stands, as a stateful part of every checkpoint (docs/run-folder.md): the step, the position
inside the epoch, the metrics history, the best checkpoint and the attempt counter.

A resumed run sees exactly the batches the uninterrupted one would have: the order of an epoch
is a pure function of (seed, epoch), and ``sample_in_epoch`` says how far into it the run got.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from job.data.synthetic import mix64


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0  # epochs completed
    sample_in_epoch: int = 0  # samples of the current epoch's order already trained on
    epoch_loss_sum: float = 0.0  # running train loss of the current epoch, across resumes
    epoch_batches: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch
    best: dict[str, Any] | None = None  # {"checkpoint": name, "val_loss": x}
    attempt: int = 0
    epoch_sample_count: int = 0  # samples trained on in the current epoch, by the whole group
    epoch_sample_hash: int = 0  # order-free digest of which samples those were (see sample_digest)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in self.keys():
            setattr(self, key, state[key])
        self.metrics = list(self.metrics)

    def count_samples(self, positions: np.ndarray) -> None:
        self.epoch_sample_count += len(positions)
        self.epoch_sample_hash = (self.epoch_sample_hash + sample_digest(positions)) % 2**64

    def epoch_complete(self, train_samples: int) -> bool:
        """Every training sample exactly once this epoch, across resumes and world sizes."""
        return self.epoch_sample_count == train_samples and self.epoch_sample_hash == sample_digest(
            np.arange(train_samples)
        )

    def start_next_epoch(self) -> None:
        self.epoch += 1
        self.sample_in_epoch, self.epoch_loss_sum, self.epoch_batches = 0, 0.0, 0
        self.epoch_sample_count, self.epoch_sample_hash = 0, 0


def sample_digest(positions: np.ndarray) -> int:
    """A digest of a multiset of sample positions that does not depend on their order: the sum
    (mod 2**64) of a 64-bit mix of each. Training a sample twice, or skipping one, changes it."""
    x = np.asarray(positions, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        return int(mix64(x).sum(dtype=np.uint64))
