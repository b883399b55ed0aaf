"""The rule every synchronous request to a run URI follows (job.storage.patience): a store that does
not answer is asked again with backoff until ``seconds`` have passed, then StorageError names it;
a refusal for good and an answer are never asked again. A fake clock that the injected sleep moves."""

from __future__ import annotations

import pytest
import structlog

from job.storage import StorageError, StoreRefused
from job.storage.folders import WriteConflict
from job.storage.patience import MAX_PAUSE_SECONDS, Patience
from tests.helpers import FakeClock

pytestmark = pytest.mark.timeout(10)

URI = "s3://bucket/run"


class FlakyStore:
    """A request that fails with ``error`` for its first ``failures`` calls, then answers."""

    def __init__(self, failures: float, error: Exception):
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "answer"


def patience(seconds: float) -> tuple[Patience, FakeClock, list[float]]:
    clock, slept = FakeClock(), []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds

    return Patience(URI, seconds, sleep=sleep, clock=clock), clock, slept


def test_a_store_away_for_a_while_is_asked_again_with_backoff_until_it_answers():
    wait, _, slept = patience(300)
    store = FlakyStore(6, ConnectionRefusedError("Could not connect to the endpoint URL"))
    with structlog.testing.capture_logs() as logs:
        assert wait(store) == "answer"
    assert store.calls == 7
    assert slept[0] <= 1.5 and all(0 < s <= MAX_PAUSE_SECONDS + 1 for s in slept)  # short at first, capped (+ jitter)
    unreachable = [e for e in logs if e["event"] == "storage.unreachable"]
    assert [e["attempt"] for e in unreachable] == [1, 2, 3, 4, 5, 6]
    assert all(e["uri"] == URI and "Could not connect" in e["error"] for e in unreachable)


def test_a_store_away_for_longer_than_the_patience_ends_in_an_error_naming_it():
    wait, clock, slept = patience(25)
    started = clock.now
    store = FlakyStore(float("inf"), TimeoutError("read timed out"))
    with pytest.raises(StorageError) as error:
        wait(store)
    assert 25 <= clock.now - started <= 25 + MAX_PAUSE_SECONDS + 1  # not given up before, nor long after
    assert URI in str(error.value) and "storage.connect_seconds" in str(error.value)
    assert "TimeoutError: read timed out" in str(error.value)
    assert store.calls == len(slept) + 1


@pytest.mark.parametrize("answer", [StoreRefused("the store refuses s3://bucket/run (AccessDenied)"),
                                    WriteConflict("lease.json changed")])
def test_a_refusal_for_good_or_an_answer_is_not_asked_again(answer):
    wait, _, slept = patience(300)
    store = FlakyStore(float("inf"), answer)
    with pytest.raises(type(answer)):
        wait(store)
    assert store.calls == 1 and slept == []
