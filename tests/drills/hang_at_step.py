"""`python -m job ARGS` with one training step that never ends, for the watchdog and DDP drills:

    python tests/drills/hang_at_step.py STEP ARGS...          (or as torchrun's training script)

The hang is put in by the test, so that the production code carries no hook for it."""

import sys
import threading

from job.cli import main
from job.training.trainer import Trainer

hang_at, steps, real_step = int(sys.argv[1]), [0], Trainer.step


def train_step(self, indices):
    steps[0] += 1
    if steps[0] == hang_at:
        threading.Event().wait()
    return real_step(self, indices)


Trainer.step = train_step
sys.exit(main(sys.argv[2:]))
