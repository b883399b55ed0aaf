"""The watchdog (job.monitoring.watchdog) driven by a fake clock: it ends a run with no step for
its limit and gives on_stall its chance."""

from __future__ import annotations

import logging

import pytest

from job.monitoring.watchdog import Watchdog
from tests.helpers import FakeClock, read_progress

pytestmark = pytest.mark.timeout(30)


def test_the_watchdog_ends_a_run_with_no_step_for_its_limit(progress, caplog):
    clock, exits = FakeClock(), []
    watchdog = Watchdog(progress, limit=60, clock=clock, exit=exits.append)
    clock.now += 59
    watchdog.tick()
    assert exits == []
    watchdog.touch()  # a step completed
    clock.now += 59
    watchdog.tick()
    assert exits == []
    clock.now += 1
    with caplog.at_level(logging.ERROR):
        watchdog.tick()
    assert exits == [Watchdog.EXIT_STALLED] == [75]
    state = read_progress(progress)
    assert state["status"] == "stalled" and "60 s" in state["error"]


def test_the_watchdog_gives_on_stall_its_chance_even_when_it_fails(progress):
    clock, exits, called = FakeClock(), [], []

    def on_stall():
        called.append(True)
        raise OSError("the store is away")

    watchdog = Watchdog(progress, limit=1, clock=clock, exit=exits.append, on_stall=on_stall)
    clock.now += 5
    with pytest.raises(OSError):
        watchdog.tick()
    assert called and exits == [75]  # the exit comes whatever on_stall did
