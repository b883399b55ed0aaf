"""A cache belongs to one run (job.storage.cache, SPEC §10): the run's identity rides in its lease,
minted at the first start and carried by every later holder; a cache of another run is moved aside
whole, never deleted."""

from __future__ import annotations

import pytest

from job.storage import Layout, LocalFolder
from job.storage.cache import bind_cache
from job.storage.lease import Lease
from tests.helpers import lease_doc

pytestmark = pytest.mark.timeout(60)

WEIGHTS = Layout.checkpoint_file("step-00000001", "model.safetensors")


def test_the_run_identity_is_minted_at_the_first_start_and_carried_by_every_later_holder(tmp_path):
    run = LocalFolder(tmp_path / "run")
    first = Lease(run, 6.0)
    first.acquire(wait_seconds=0)
    first.release()
    second = Lease(run, 6.0)
    second.acquire(wait_seconds=0)
    second.renew()
    assert first.run_id and second.run_id == first.run_id == lease_doc(run)["run_id"]
    second.release()
    run.delete(Layout.lease)  # the run folder wiped: the next start is another run's first
    third = Lease(run, 6.0)
    third.acquire(wait_seconds=0)
    assert third.run_id not in (None, first.run_id)


def test_a_cache_of_another_run_is_moved_aside_whole_and_a_cache_of_its_own_run_is_kept(tmp_path):
    cache = LocalFolder(tmp_path / "cache")
    assert bind_cache(cache, "aaa") is None  # nothing there yet: just bound
    cache.write_bytes(WEIGHTS, b"weights of run aaa")
    assert bind_cache(cache, "aaa") is None and cache.read_bytes(WEIGHTS) == b"weights of run aaa"

    moved = bind_cache(cache, "bbb")
    assert moved is not None and moved.parent == cache.path(Layout.cache_moved_aside) and moved.name.endswith("-aaa")
    assert (moved / WEIGHTS).read_bytes() == b"weights of run aaa"
    assert sorted(p.name for p in cache.root.iterdir()) == sorted([Layout.cache_moved_aside, Layout.cache_run_id])
    assert cache.read_bytes(Layout.cache_run_id) == b"bbb"

    cache.delete(Layout.cache_run_id)  # a cache older than identities
    cache.write_bytes(WEIGHTS, b"weights of nobody knows which run")
    again = bind_cache(cache, "bbb")
    assert again is not None and again.name.endswith("-unbound") and (again / WEIGHTS).exists()
    assert (moved / WEIGHTS).exists()  # what was moved aside before stays
