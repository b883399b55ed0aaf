"""Fixtures: one uninterrupted smoke run shared by the drills that compare against it, and a real
S3 endpoint (moto's server on a free local port) with a fresh bucket per test."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.helpers import FaultyStore, S3Bucket, S3Endpoint, run_job

DRILLS = Path(__file__).parent / "drills"


def pytest_collection_modifyitems(items):
    """`slow` is set by folder: every test under tests/drills/ (the job as a process, kills, the
    store taken away) is slow, and none elsewhere is; a trained run is for drills alone."""
    for item in items:
        if DRILLS in item.path.parents:
            item.add_marker(pytest.mark.slow)
        elif "smoke_baseline" in getattr(item, "fixturenames", ()):
            raise pytest.UsageError(f"{item.nodeid} uses smoke_baseline, a trained run: it is a drill (tests/drills/)")


@pytest.fixture(scope="session")
def smoke_baseline(tmp_path_factory) -> Path:
    """One uninterrupted smoke run, shared by the tests that compare against it."""
    run = tmp_path_factory.mktemp("baseline") / "run"
    # Both stages; a loaded 2-core machine takes minutes where a quiet one takes seconds.
    result = run_job("train", "--preset", "smoke", "--run-uri", str(run), timeout=600)
    assert result.returncode == 0, result.stderr + result.stdout[-3000:]
    return run


@pytest.fixture(scope="session")
def s3_endpoint():
    endpoint = S3Endpoint()
    yield endpoint
    endpoint.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch) -> S3Bucket:
    bucket = S3Bucket(s3_endpoint, f"test-{uuid.uuid4().hex[:12]}")
    for key, value in bucket.env.items():
        monkeypatch.setenv(key, value)
    return bucket


@pytest.fixture
def faulty_store(s3):
    """A proxy in front of the test's bucket that answers the requests a test chooses with S3
    errors; the job reaches it through the environment ``faulty_store.env``."""
    proxy = FaultyStore(s3.endpoint.url)
    proxy.env = {**s3.env, "AWS_ENDPOINT_URL": proxy.url}
    yield proxy
    proxy.close()
