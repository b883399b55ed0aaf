"""The progress fixture the monitoring tests share."""

from __future__ import annotations

import pytest

from job.monitoring.progress import Progress
from job.storage import RunStore


@pytest.fixture
def progress(tmp_path) -> Progress:
    return Progress(RunStore(str(tmp_path)), attempt=2, epochs=4, total_steps=100)


