"""A local cache belongs to one run (docs/storage.md, "The cache"): it records the identity of the
run it mirrors (the ``run_id`` of the run's lease), and a cache whose identity is not the run URI's
(the bucket was wiped, another store answers at the same URI, the cache is older than identities)
is moved aside before anything reads it, so that it is never resumed from nor uploaded, and
nothing of it is lost."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import structlog

from job.storage.folders import LocalFolder
from job.storage.layout import Layout

log = structlog.get_logger("job.storage")


def bind_cache(cache: LocalFolder, run_id: str) -> Path | None:
    """Make ``cache`` the working copy of run ``run_id``: kept when it already is one, else its
    content is moved into ``.moved-aside/<time>-<its run>/`` inside it (a rename: a cache that is a
    mount point cannot be renamed itself). Returns where it went, if it moved."""
    recorded = (cache.read_bytes(Layout.cache_run_id) or b"").decode(errors="replace").strip()
    if recorded == run_id:
        return None
    own = {Layout.cache_run_id, Layout.cache_moved_aside}
    content = [p for p in cache.root.iterdir() if p.name not in own] if cache.root.is_dir() else []
    moved = None
    if content:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        label = recorded[:64] if recorded.isalnum() else "unbound"
        moved = cache.path(Layout.cache_moved_aside) / f"{stamp}-{label}"
        moved.mkdir(parents=True)
        for path in content:
            path.rename(moved / path.name)
        log.warning(
            "cache.moved_aside", cache=str(cache.root), moved_to=str(moved), cache_run=recorded or None, run=run_id,
            why="the cache belongs to another run than the one at the run URI: never resumed from, kept there",
        )
    cache.write_bytes(Layout.cache_run_id, run_id.encode())
    return moved
