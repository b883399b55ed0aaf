"""The order of a stage's training samples in an epoch: a pure function of (seed, epoch, stage), so
that a resumed run sees exactly the batches the uninterrupted one would have."""

from __future__ import annotations

import numpy as np


def epoch_order(seed: int, epoch: int, n: int, stream: tuple[int, ...] = ()) -> np.ndarray:
    """The order of the training samples in one epoch: a pure function of (seed, epoch, and the
    stage's stream)."""
    return np.random.Generator(np.random.PCG64([seed, epoch, *stream])).permutation(n)
