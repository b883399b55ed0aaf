"""Stop signals (job.runtime.signals): a signal is a request, the handler is put back, and a long
phase ends at its next stop point."""

from __future__ import annotations

import os
import signal

import pytest

from job.monitoring.progress import Progress
from job.runtime.signals import Stopped, StopRequest, stop_point
from job.storage import RunStore

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def progress(tmp_path) -> Progress:
    return Progress(RunStore(str(tmp_path)), attempt=2, epochs=4, total_steps=100)


def test_a_stop_signal_is_a_request_and_the_handler_is_put_back(progress):
    previous = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # a second signal changes nothing
        assert stop.requested and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_long_phase_ends_at_its_next_stop_point_once_a_signal_arrived():
    stop_point("generating the dataset")  # no StopRequest installed: nothing to honour
    with StopRequest():
        stop_point("generating the dataset")
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(Stopped, match="stopped by SIGINT while generating the dataset"):
            stop_point("generating the dataset")
    stop_point("generating the dataset")  # the request ended with its block
